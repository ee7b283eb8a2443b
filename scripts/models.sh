#!/usr/bin/env bash
# Writes the test models into build/models (idempotent; regenerated when the generators change).
#   build/models/archs/  random-weight models of every architecture llama.cpp supports, MoE
#                        (*-moe, 2 experts, both used) and dense (*-dense) (test-llama-archs -o)
#   build/models/many/   many experts, few used, several quant types (tests/tools/make-moe-model)
#   build/models/hybrid/ 4 layers, for the hybrid CPU+GPU tests (tests/e2e/hybrid.sh), where -ngl 2
#                        and --n-cpu-moe 2 leave some layers' experts on the GPU and others not
set -euo pipefail
source "$(dirname "$0")/lib.sh"

stamp_archs=$(sha256sum "$B/test-llama-archs" | cut -c1-16)
if [ "$(cat "$M/archs/.stamp" 2>/dev/null)" != "$stamp_archs" ]; then
    rm -rf "$M/archs"
    mkdir -p "$M/archs"
    "$B/test-llama-archs" -o "$M/archs" > "$M/archs.log" 2>&1
    echo "$stamp_archs" > "$M/archs/.stamp"
fi

stamp_many=$({ cat "$GEN" "$root/scripts/models.sh"; echo "${SMALL_SHAPE[*]}"; } | sha256sum | cut -c1-16)
if [ "$(cat "$M/many/.stamp" 2>/dev/null)" != "$stamp_many" ]; then
    rm -rf "$M/many"
    mkdir -p "$M/many"
    gen() {
        local name=$1
        shift
        "$GEN" --out "$M/many/$name.gguf" "${SMALL_SHAPE[@]}" "$@" > /dev/null
    }
    gen e32u4-q8_0    --experts 32  --used 4 --ff 256 --type q8_0   --seed 1
    gen e64u8-q4_K    --experts 64  --used 8 --ff 256 --type q4_K   --seed 2
    gen e128u8-iq4_xs --experts 128 --used 8 --ff 256 --type iq4_xs --seed 3
    gen e48u6-f16     --experts 48  --used 6 --ff 128 --type f16    --seed 4
    gen e32u4-mxfp4   --experts 32  --used 4 --ff 256 --type mxfp4  --seed 5
    gen e64u4-q4_0    --experts 64  --used 4 --ff 256 --type q4_0   --seed 6
    gen e32u8-bf16    --experts 32  --used 8 --ff 128 --type bf16   --seed 7
    gen e96u6-q6_K    --experts 96  --used 6 --ff 256 --type q6_K   --seed 8
    gen e64u8-iq4_nl  --experts 64  --used 8 --ff 256 --type iq4_nl --seed 9
    echo "$stamp_many" > "$M/many/.stamp"
fi
stamp_hybrid=$({ cat "$GEN"; sed -n '/^stamp_hybrid/,$p' "$root/scripts/models.sh"; echo "${SMALL_SHAPE[*]}"; } | sha256sum | cut -c1-16)
if [ "$(cat "$M/hybrid/.stamp" 2>/dev/null)" != "$stamp_hybrid" ]; then
    rm -rf "$M/hybrid"
    mkdir -p "$M/hybrid"
    # q4_0: a type CPU_REPACK repacks on x86, so the layout each configuration gets is checked too
    "$GEN" --out "$M/hybrid/e32u4-q4_0-l4.gguf" "${SMALL_SHAPE[@]}" --layers 4 --experts 32 --used 4 --ff 256 --type q4_0 --seed 10 > /dev/null
    echo "$stamp_hybrid" > "$M/hybrid/.stamp"
fi
echo "models: $(ls "$M"/archs/*.gguf | wc -l) architectures, $(ls "$M"/many/*.gguf | wc -l) many-expert models, $(ls "$M"/hybrid/*.gguf | wc -l) hybrid models in $M"
