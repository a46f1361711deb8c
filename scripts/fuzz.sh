#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS each (default 600), two at a time,
# starting from the committed corpus (fuzz/corpus/<target>/) and the seeds below; then minimizes
# each corpus and keeps a small part of it in git. Needs the nightly toolchain and `cargo install cargo-fuzz`. A crash stops its target
# and leaves the input in fuzz/artifacts/<target>/.
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
targets=(news_decoder pipeline_config rules_config sql_guard model_folder)
# Seeds: the shipped files and a few messages, so the fuzzer starts from valid inputs.
mkdir -p fuzz/corpus/{news_decoder,pipeline_config,rules_config,sql_guard,model_folder}
# A model folder's labels.json, a NUL byte, then a heads.json.
{ cat models/labels.json; printf '\0'; cat models/refit/heads.json 2>/dev/null || true; } >fuzz/corpus/model_folder/seed-bundled
head -n 20 pipelines/data/reuters-1987.jsonl | split -l 1 - fuzz/corpus/news_decoder/seed-
cp pipelines/*.toml fuzz/corpus/pipeline_config/
cp alerts/*.toml fuzz/corpus/rules_config/
grep -v '^--' tests/sql/forbidden.sql | grep -v '^$' | split -l 1 - fuzz/corpus/sql_guard/seed-forbidden-
awk '/^```sql/{f=1; n++; next} /^```/{f=0} f{print > ("fuzz/corpus/sql_guard/seed-docs-" n)}' docs/SQL.md
run() {
  cargo +nightly fuzz run --sanitizer none "$1" "fuzz/corpus/$1" -- -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 \
    >"fuzz/$1.log" 2>&1 && echo "$1: clean for ${seconds} s ($(grep -o 'stat::number_of_executed_units: [0-9]*' "fuzz/$1.log" | tail -1 | awk '{print $2}') runs)" \
    || { echo "$1: FAILED, see fuzz/$1.log"; return 1; }
}
status=0
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  run "${targets[i]}" & a=$!
  if ((i + 1 < ${#targets[@]})); then run "${targets[i+1]}" & b=$!; else b=""; fi
  wait $a || status=1
  if [[ -n "$b" ]]; then wait $b || status=1; fi
done
# Minimize, then keep the 200 smallest inputs of each in git (fuzz/corpus/); the rest stays local in
# fuzz/target/corpus-rest/ and is merged back by the next run.
for target in "${targets[@]}"; do
  mkdir -p "fuzz/target/corpus-rest/$target"
  cp -n fuzz/target/corpus-rest/"$target"/* "fuzz/corpus/$target/" 2>/dev/null || true
  cargo +nightly fuzz cmin --sanitizer none "$target" "fuzz/corpus/$target" >/dev/null 2>&1 || true
  ls -S -r "fuzz/corpus/$target" | tail -n +201 | while read -r f; do mv "fuzz/corpus/$target/$f" "fuzz/target/corpus-rest/$target/"; done
done
exit $status
