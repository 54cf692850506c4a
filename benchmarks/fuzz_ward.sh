#!/usr/bin/env bash
# Build the Ward core with AddressSanitizer and UndefinedBehaviorSanitizer and fuzz it against a
# naive O(n^3) Ward for a bounded time (csrc/fuzz/fuzz_ward.cpp says what is checked).
#
#   bash benchmarks/fuzz_ward.sh [SECONDS=60] [SEED=random]
#
# Needs g++ (or CXX) with libasan/libubsan. Exits non-zero on any finding: a failed check, or a
# sanitizer report (errors are fatal: -fno-sanitize-recover=all).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
seed="${2:-$(date +%s)}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"${CXX:-g++}" -std=c++17 -O1 -g -fno-omit-frame-pointer -ffp-contract=off -Wall -Wno-psabi \
  -fsanitize=address,undefined -fno-sanitize-recover=all \
  csrc/fuzz/fuzz_ward.cpp -o "$out/fuzz_ward"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
  "$out/fuzz_ward" "$seconds" "$seed"
