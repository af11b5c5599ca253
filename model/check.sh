#!/usr/bin/env bash
# Exhaustive checks of the ring protocol model (ring.pml) with spin.
#
#   model/check.sh
#
# Runs, in a temporary directory (nothing is written next to the model):
#   - the correct model: safety (assertions + invalid end states) and
#     liveness (ltl `delivered`, acceptance cycles, no fairness assumption);
#   - every deliberately broken variant, each of which must FAIL with the
#     expected kind of error.
# Prints the key spin figures of every run and exits 0 only if the correct
# model passes everything and every broken variant is caught.
#
# Extra spin -D options for the model (sizes) can be given in MODEL_DEFS,
# e.g. MODEL_DEFS="-DNMSG=4" model/check.sh

set -u

here="$(cd "$(dirname "$0")" && pwd)"
model="$here/ring.pml"
depth=100000            # pan -m: far above the deepest path (~800 steps)
memlim=4096             # MB: pan stops cleanly instead of swapping
model_defs="${MODEL_DEFS:-}"

for tool in spin gcc; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "check.sh: '$tool' is not installed." >&2
        if [ "$tool" = spin ]; then
            echo "check.sh: install it with: apt-get install spin" >&2
        fi
        exit 2
    fi
done
if [ ! -f "$model" ]; then
    echo "check.sh: model not found: $model" >&2
    exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/shmcast-model.XXXXXX")" || exit 2
trap 'rm -rf "$work"' EXIT INT TERM

failures=0
start_all=$(date +%s)

# run_check NAME DEFINE MODE EXPECT
#   DEFINE: extra spin -D option ("" for the correct model)
#   MODE:   safety | liveness
#   EXPECT: "pass", or the pan message the run must report (a failure)
run_check() {
    local name=$1 define=$2 mode=$3 expect=$4
    local dir out errors stored trans depthr secs first verdict
    dir="$work/$name-$mode"
    mkdir -p "$dir" && cp "$model" "$dir/ring.pml" || return 1
    (
        cd "$dir" || exit 1
        # shellcheck disable=SC2086  # word splitting of the -D options is wanted
        spin $model_defs $define -a ring.pml >spin.log 2>&1 || { cat spin.log; exit 1; }
        if [ "$mode" = safety ]; then
            cflags="-DSAFETY -DNOCLAIM"
            panflags=""
        else
            cflags=""
            panflags="-a"      # no fairness needed: see ring.pml
        fi
        # shellcheck disable=SC2086
        gcc -O2 -DCOLLAPSE -DMEMLIM=$memlim $cflags -o pan pan.c >gcc.log 2>&1 \
            || { cat gcc.log; exit 1; }
        # shellcheck disable=SC2086
        ./pan -m$depth $panflags >pan.out 2>&1
        exit 0
    ) || {
        echo "FAIL  $name/$mode: could not build or run the verifier"
        failures=$((failures + 1))
        return 0
    }

    out="$dir/pan.out"
    errors=$(sed -n 's/.*errors: *\([0-9][0-9]*\).*/\1/p' "$out" | tail -n 1)
    stored=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' "$out" | tail -n 1)
    trans=$(sed -n 's/^ *\([0-9.e+]*\) transitions.*/\1/p' "$out" | tail -n 1)
    depthr=$(sed -n 's/.*depth reached *\([0-9][0-9]*\).*/\1/p' "$out" | tail -n 1)
    secs=$(sed -n 's/^pan: elapsed time *\([0-9.e+-]*\) seconds.*/\1/p' "$out" | tail -n 1)
    first=$(grep -m 1 '^pan:1:' "$out" | sed 's/^pan:1: //')

    printf '%-34s states stored %10s  transitions %10s  depth %5s  errors %s  (%ss)\n' \
        "$name/$mode" "${stored:-?}" "${trans:-?}" "${depthr:-?}" "${errors:-?}" "${secs:-?}"

    verdict=ok
    if [ -z "$errors" ]; then
        verdict="no result from pan"
    elif grep -q 'max search depth too small' "$out"; then
        verdict="search depth too small (raise -m)"
    elif grep -qi 'out of memory\|MEMLIM bound' "$out"; then
        verdict="out of memory"
    elif [ "$expect" = pass ]; then
        [ "$errors" -eq 0 ] || verdict="expected 0 errors, got $errors: $first"
    else
        if [ "$errors" -eq 0 ]; then
            verdict="broken variant NOT detected (expected: $expect)"
        elif ! grep -q "^pan:1: $expect" "$out"; then
            verdict="expected '$expect', got: $first"
        fi
    fi
    if [ "$verdict" = ok ]; then
        if [ "$expect" = pass ]; then
            echo "  ok    passes"
        else
            echo "  ok    caught as expected: $first"
        fi
    else
        echo "  FAIL  $verdict"
        sed 's/^/        | /' "$out" | grep -v '^        | Depth=' | head -n 40
        failures=$((failures + 1))
    fi
}

echo "spin: $(spin -V 2>&1 | head -n 1)"
echo "model: ring.pml${model_defs:+ ($model_defs)}"
echo
echo "== correct model (must pass)"
run_check correct ""                           safety   pass
run_check correct ""                           liveness pass
echo
echo "== broken variants (must fail)"
run_check late_announce     -DBROKEN_LATE_ANNOUNCE    safety   "invalid end state"
run_check late_announce     -DBROKEN_LATE_ANNOUNCE    liveness "acceptance cycle"
run_check announce_first    -DBROKEN_ANNOUNCE_FIRST   safety   "invalid end state"
run_check announce_first    -DBROKEN_ANNOUNCE_FIRST   liveness "acceptance cycle"
run_check count_early       -DBROKEN_COUNT_EARLY      safety   "invalid end state"
run_check count_early       -DBROKEN_COUNT_EARLY      liveness "acceptance cycle"
run_check no_wake           -DBROKEN_NO_WAKE          safety   "invalid end state"
run_check no_wake           -DBROKEN_NO_WAKE          liveness "acceptance cycle"
run_check late_drain        -DBROKEN_LATE_DRAIN       safety   "invalid end state"
run_check late_drain        -DBROKEN_LATE_DRAIN       liveness "acceptance cycle"
run_check late_mark         -DBROKEN_LATE_MARK        safety   "invalid end state"
run_check late_mark         -DBROKEN_LATE_MARK        liveness "acceptance cycle"
run_check writer_late_flag  -DBROKEN_WRITER_LATE_FLAG safety   "invalid end state"
run_check writer_late_flag  -DBROKEN_WRITER_LATE_FLAG liveness "acceptance cycle"
run_check early_publish     -DBROKEN_EARLY_PUBLISH    safety   "assertion violated"
run_check early_release     -DBROKEN_EARLY_RELEASE    safety   "assertion violated"
run_check gate_off_by_one   -DBROKEN_GATE             safety   "assertion violated"

echo
echo "total time: $(( $(date +%s) - start_all ))s"
if [ "$failures" -ne 0 ]; then
    echo "RESULT: FAILED ($failures check(s))"
    exit 1
fi
echo "RESULT: all checks passed (correct model verified, every broken variant caught)"
exit 0
