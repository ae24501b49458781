#!/usr/bin/env bash
# synth_digits/asr1: a small ESPnet ASR recipe that runs on 2 CPU cores.
#
# Spoken digit strings synthesised offline with espeak-ng (PyPI package
# espeakng-loader), a transformer encoder and an S4 decoder whose layers are
# [s4, mha, ff]. It compares ESPnet's stock state-space `mha` layer with
# espnet_mha's `flash_mha`: same checkpoint decoded with both, and a model
# trained with `flash_mha`. See README.md for the stages and results.
#
# Usage: ./run.sh [--stage N] [--stop_stage N] [--quick] [--python PYTHON]
#                 [--train_threads N] [--decode_threads N] [--require_identical true|false]
set -euo pipefail

log() {
    local fname=${BASH_SOURCE[1]##*/}
    echo -e "$(date '+%Y-%m-%dT%H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}

stage=1
stop_stage=6
quick=false
python=python3          # must see torch, espnet and (for stages 4-5) espnet_mha
seed=1234               # corpus seed; the training seed is in the configs
train_threads=1         # torch intra-op threads of training (1 stays fast on a busy machine)
decode_threads=1        # torch intra-op threads of every decode (same for all)
require_identical=true  # stage 4 fails if flash_mha changes any hypothesis
train_config=conf/train_asr_s4dec_mha.yaml
flash_train_config=conf/train_asr_s4dec_flash_mha.yaml
inference_config=conf/decode_asr.yaml
inference_model=valid.acc.ave.pth

while [ $# -gt 0 ]; do
    case "$1" in
        --quick)
            if [ $# -gt 1 ] && { [ "$2" = true ] || [ "$2" = false ]; }; then
                quick=$2; shift
            else
                quick=true
            fi ;;
        --stage|--stop_stage|--python|--seed|--train_threads|--decode_threads|--require_identical|\
        --train_config|--flash_train_config|--inference_config|--inference_model)
            [ $# -gt 1 ] || { log "Error: $1 needs a value"; exit 2; }
            declare "${1#--}=$2"; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) log "Error: unknown option '$1'"; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")"
# espnet_mha can make the plain `mha` name build its layer (ESPNET_MHA_REPLACE_MHA=1);
# the stock rows of this recipe must run ESPnet's own layer.
unset ESPNET_MHA_REPLACE_MHA

if "${quick}"; then
    # CI size: the whole run takes about 2-3 minutes; the models are far from converged.
    datadir=data/quick; expdir=exp/quick
    n_train=480; n_dev=40; n_test=40
    train_args="--max_epoch 6"; flash_train_args="--max_epoch 3"
else
    datadir=data; expdir=exp
    n_train=2400; n_dev=200; n_test=200
    train_args=""; flash_train_args="--max_epoch 5"
fi

token_type=word
token_list=${datadir}/token_list/${token_type}/tokens.txt
stats_dir=${expdir}/asr_stats_raw_${token_type}
stock_exp=${expdir}/asr_stock
flash_exp=${expdir}/asr_flash
decode_tag=decode_asr_${inference_model%.pth}
test_set=test

# Options shared by collect-stats and training, as egs2/TEMPLATE/asr1/asr.sh passes them.
common_args=(
    --use_preprocessor true --bpemodel none --token_type "${token_type}"
    --token_list "${token_list}" --non_linguistic_symbols none
    --cleaner none --g2p none --frontend_conf fs=16k --ngpu 0 --num_workers 0
)

check_flash_mha() {
    # espnet_mha registers flash_mha when espnet2 is imported (startup hook).
    local out
    if ! out=$("${python}" -c "
import espnet2.asr.state_spaces.registry as registry
assert 'flash_mha' in registry.layer, 'registered layers: ' + ', '.join(sorted(registry.layer))
" 2>&1); then
        echo "${out}" | tail -n 3
        log "Error: 'flash_mha' is not in espnet2's state-space layer registry (python: ${python})."
        log "Install espnet_mha into that environment: pip install -e <repo root>; then re-run from this stage."
        exit 1
    fi
}

train() {
    # train <config> <exp dir> [extra asr_train args...]
    local config=$1 dir=$2
    shift 2
    if [ -e "${dir}/${inference_model}" ]; then
        log "${dir}/${inference_model} exists: skip training (remove ${dir} to retrain)"
        return
    fi
    mkdir -p "${dir}"
    log "Training ${config} -> ${dir} (log: ${dir}/train.log)"
    local start=${SECONDS}
    OMP_NUM_THREADS=${train_threads} MKL_NUM_THREADS=${train_threads} \
    "${python}" -m espnet2.bin.asr_train "${common_args[@]}" \
        --config "${config}" \
        --normalize global_mvn \
        --normalize_conf "stats_file=${stats_dir}/train/feats_stats.npz" \
        --train_data_path_and_name_and_type "${datadir}/train/wav.scp,speech,sound" \
        --train_data_path_and_name_and_type "${datadir}/train/text,text,text" \
        --train_shape_file "${stats_dir}/train/speech_shape" \
        --train_shape_file "${stats_dir}/train/text_shape.${token_type}" \
        --valid_data_path_and_name_and_type "${datadir}/dev/wav.scp,speech,sound" \
        --valid_data_path_and_name_and_type "${datadir}/dev/text,text,text" \
        --valid_shape_file "${stats_dir}/valid/speech_shape" \
        --valid_shape_file "${stats_dir}/valid/text_shape.${token_type}" \
        --resume true \
        --fold_length 80000 --fold_length 150 \
        --output_dir "${dir}" \
        "$@" > "${dir}/train.log" 2>&1 \
        || { tail -n 40 "${dir}/train.log"; log "Error: training failed, see ${dir}/train.log"; exit 1; }
    echo "$((SECONDS - start))" > "${dir}/train_wall_s"
    log "Training done in $((SECONDS - start)) s: $(grep -o '[0-9]*epoch results: \[train\].*' "${dir}/train.log" | tail -n 1 | cut -c1-200)"
}

decode() {
    # decode <asr_train_config> <asr_model_file> <output dir>: one job, batch 1, CPU.
    local config=$1 model=$2 dir=$3
    local logdir=${dir}/logdir
    rm -rf "${logdir}"; mkdir -p "${logdir}"
    log "Decoding ${datadir}/${test_set} with ${config} + ${model} -> ${dir}"
    local start end
    start=$(date +%s.%N)
    OMP_NUM_THREADS=${decode_threads} MKL_NUM_THREADS=${decode_threads} \
    "${python}" -m espnet2.bin.asr_inference \
        --batch_size 1 --ngpu 0 --num_workers 0 \
        --data_path_and_name_and_type "${datadir}/${test_set}/wav.scp,speech,sound" \
        --key_file "${datadir}/${test_set}/wav.scp" \
        --asr_train_config "${config}" \
        --asr_model_file "${model}" \
        --output_dir "${logdir}/output.1" \
        --config "${inference_config}" \
        > "${logdir}/asr_inference.1.log" 2>&1 \
        || { tail -n 40 "${logdir}/asr_inference.1.log"; log "Error: decoding failed, see ${logdir}/asr_inference.1.log"; exit 1; }
    end=$(date +%s.%N)
    for f in token token_int score text; do
        sort -k1,1 "${logdir}/output.1/1best_recog/${f}" > "${dir}/${f}"
    done
    "${python}" local/score.py \
        --ref "${datadir}/${test_set}/text" --hyp "${dir}/text" \
        --utt2dur "${datadir}/${test_set}/utt2dur" \
        --log "${logdir}/asr_inference.1.log" \
        --process_wall_s "$(echo "${end} ${start}" | awk '{ printf "%.3f", $1 - $2 }')" \
        --threads "${decode_threads}" \
        --out "${dir}/metrics.json"
}

if [ "${stage}" -le 1 ] && [ "${stop_stage}" -ge 1 ]; then
    log "Stage 1: generate the corpus in ${datadir} (seed ${seed})"
    rm -rf "${datadir}/train" "${datadir}/dev" "${datadir}/test" "${datadir}/wav"
    "${python}" local/data.py --out "${datadir}" --seed "${seed}" \
        --n_train "${n_train}" --n_dev "${n_dev}" --n_test "${n_test}"
fi

if [ "${stage}" -le 2 ] && [ "${stop_stage}" -ge 2 ]; then
    log "Stage 2: ${token_type} token list and statistics collection"
    mkdir -p "$(dirname "${token_list}")"
    # <blank> first and <sos/eos> last, as asr.sh makes them.
    "${python}" -m espnet2.bin.tokenize_text \
        --token_type "${token_type}" \
        --input "${datadir}/train/text" --output "${token_list}" \
        --field 2- --cleaner none --g2p none \
        --write_vocabulary true \
        --add_symbol "<blank>:0" --add_symbol "<unk>:1" --add_symbol "<sos/eos>:-1"
    log "Token list: ${token_list} ($(wc -l < "${token_list}") tokens)"

    rm -rf "${stats_dir}"; mkdir -p "${stats_dir}/logdir"
    # One stats job: the key files are the wav.scp themselves.
    OMP_NUM_THREADS=${train_threads} MKL_NUM_THREADS=${train_threads} \
    "${python}" -m espnet2.bin.asr_train "${common_args[@]}" \
        --collect_stats true \
        --config "${train_config}" \
        --train_data_path_and_name_and_type "${datadir}/train/wav.scp,speech,sound" \
        --train_data_path_and_name_and_type "${datadir}/train/text,text,text" \
        --valid_data_path_and_name_and_type "${datadir}/dev/wav.scp,speech,sound" \
        --valid_data_path_and_name_and_type "${datadir}/dev/text,text,text" \
        --train_shape_file "${datadir}/train/wav.scp" \
        --valid_shape_file "${datadir}/dev/wav.scp" \
        --output_dir "${stats_dir}/logdir/stats.1" \
        > "${stats_dir}/logdir/stats.1.log" 2>&1 \
        || { tail -n 40 "${stats_dir}/logdir/stats.1.log"; exit 1; }
    "${python}" -m espnet2.bin.aggregate_stats_dirs \
        --input_dir "${stats_dir}/logdir/stats.1" --output_dir "${stats_dir}"
    # Append the vocabulary size to the text shapes (used for batch-bins counts).
    for dset in train valid; do
        awk -v N="$(wc -l < "${token_list}")" '{ print $0 "," N }' \
            "${stats_dir}/${dset}/text_shape" > "${stats_dir}/${dset}/text_shape.${token_type}"
    done
fi

if [ "${stage}" -le 3 ] && [ "${stop_stage}" -ge 3 ]; then
    log "Stage 3: train with the stock 'mha' layer (${train_config}) and decode ${test_set}"
    # shellcheck disable=SC2086
    train "${train_config}" "${stock_exp}" ${train_args}
    decode "${stock_exp}/config.yaml" "${stock_exp}/${inference_model}" \
        "${stock_exp}/${decode_tag}/${test_set}"
fi

if [ "${stage}" -le 4 ] && [ "${stop_stage}" -ge 4 ]; then
    log "Stage 4: decode the stock checkpoint with 'flash_mha' swapped into its config"
    check_flash_mha
    swapped=${stock_exp}/config_flash_mha.yaml
    sed -E 's/^([ -]*_name_: )mha$/\1flash_mha/' "${stock_exp}/config.yaml" > "${swapped}"
    n_swapped=$(diff "${stock_exp}/config.yaml" "${swapped}" | grep -c '^>' || true)
    if [ "${n_swapped}" -eq 0 ]; then
        log "Error: no '_name_: mha' line in ${stock_exp}/config.yaml"; exit 1
    fi
    log "Swapped ${n_swapped} layer name line(s): ${swapped}"
    decode "${swapped}" "${stock_exp}/${inference_model}" \
        "${stock_exp}/decode_flash_mha_${inference_model%.pth}/${test_set}"
    "${python}" local/compare_hyps.py \
        --ref_dir "${stock_exp}/${decode_tag}/${test_set}" \
        --hyp_dir "${stock_exp}/decode_flash_mha_${inference_model%.pth}/${test_set}" \
        --require_identical "${require_identical}"
fi

if [ "${stage}" -le 5 ] && [ "${stop_stage}" -ge 5 ]; then
    log "Stage 5: train with 'flash_mha' (${flash_train_config}) and decode ${test_set}"
    check_flash_mha
    # shellcheck disable=SC2086
    train "${flash_train_config}" "${flash_exp}" ${flash_train_args}
    decode "${flash_exp}/config.yaml" "${flash_exp}/${inference_model}" \
        "${flash_exp}/${decode_tag}/${test_set}"
    "${python}" local/compare_hyps.py \
        --ref_dir "${stock_exp}/${decode_tag}/${test_set}" \
        --hyp_dir "${flash_exp}/${decode_tag}/${test_set}" \
        --require_identical false
fi

if [ "${stage}" -le 6 ] && [ "${stop_stage}" -ge 6 ]; then
    log "Stage 6: results table"
    "${python}" local/make_table.py \
        --row "stock mha|${stock_exp}/${decode_tag}/${test_set}|${stock_exp}" \
        --row "flash_mha on stock checkpoint|${stock_exp}/decode_flash_mha_${inference_model%.pth}/${test_set}|${stock_exp}" \
        --row "flash_mha trained|${flash_exp}/${decode_tag}/${test_set}|${flash_exp}" \
        --out_md "${expdir}/results.md" --out_json "${expdir}/results.json"
fi

log "Successfully finished."
