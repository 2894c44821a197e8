#!/usr/bin/env bash
# G-OPD (ExOPD, lam = 1.25) in verl 0.9.1 with the gopd plug-in: the paper's recipe on GPUs.
#
#   pip install "verl[vllm]==0.9.1"; pip install --no-build-isolation -e ".[verl]"   # the plug-in
#   STUDENT_MODEL=Qwen/Qwen3-1.7B TEACHER_MODEL=/path/to/qwen3-4b-math-grpo bash examples/verl_gopd.sh
#
# Extra Hydra overrides go last: `bash examples/verl_gopd.sh ++gopd.lam=1.0 trainer.total_epochs=1`.
# What each G-OPD setting is for, and what was and was not run: docs/scaling.md ("verl").
# The student (verl's actor) samples one response per prompt at temperature 1 with vLLM; the teacher is
# served by verl's teacher servers (sampled-token log-probs); the reference is verl's ref worker, a frozen
# copy of the student's initial weights; the loss is the plug-in's `gopd`.
set -xeuo pipefail

STUDENT_MODEL=${STUDENT_MODEL:-Qwen/Qwen3-1.7B}
TEACHER_MODEL=${TEACHER_MODEL:?set TEACHER_MODEL to the teacher checkpoint (the paper: Qwen3-4B after math GRPO)}
TRAIN_FILES=${TRAIN_FILES:-$HOME/data/math/train.parquet}
VAL_FILES=${VAL_FILES:-$HOME/data/math/test.parquet}
NNODES=${NNODES:-1}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
TEACHER_GPUS=${TEACHER_GPUS:-2}          # GPUs per node of the teacher servers' pool
TEACHER_TP=${TEACHER_TP:-1}
ROLLOUT_TP=${ROLLOUT_TP:-1}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-16384}  # the paper: responses up to 16k tokens
TOKENS_PER_GPU=${TOKENS_PER_GPU:-$(( (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2 ))}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-1024}         # the paper: 1024 prompts, one rollout each

GOPD=(
# >>> G-OPD settings (the start-up check of the plug-in passes on exactly these; tests read this block)
    distillation.enabled=True
    distillation.distillation_loss.loss_mode=gopd
    ++gopd.lam=1.25
    ++gopd.advantage=current
    distillation.distillation_loss.use_task_rewards=False
    distillation.distillation_loss.use_policy_gradient=True
    distillation.distillation_loss.policy_loss_mode=vanilla
    distillation.distillation_loss.clip_ratio_low=0.2
    distillation.distillation_loss.clip_ratio_high=0.2
    distillation.distillation_loss.loss_max_clamp=null
    distillation.distillation_loss.log_prob_min_clamp=null
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef=0.0
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean
    actor_rollout_ref.actor.ppo_epochs=1
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.rollout.n=1
    actor_rollout_ref.rollout.temperature=1.0
    actor_rollout_ref.rollout.top_p=1.0
    actor_rollout_ref.rollout.top_k=-1
    actor_rollout_ref.rollout.calculate_log_probs=True
    algorithm.use_kl_in_reward=False
    algorithm.rollout_correction.rollout_is=token
    algorithm.rollout_correction.rollout_is_threshold=5.0
    algorithm.rollout_correction.rollout_is_batch_normalize=False
    algorithm.rollout_correction.rollout_rs=null
    algorithm.rollout_correction.bypass_mode=False
# <<< G-OPD settings
)

RUN=(
    algorithm.adv_estimator=grpo
    data.train_files="$TRAIN_FILES"
    data.val_files="$VAL_FILES"
    data.train_batch_size=$TRAIN_BATCH_SIZE
    data.max_prompt_length=$MAX_PROMPT_LENGTH
    data.max_response_length=$MAX_RESPONSE_LENGTH
    data.filter_overlong_prompts=True
    data.truncation=error
    actor_rollout_ref.model.path="$STUDENT_MODEL"
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.actor.optim.lr=1e-5
    actor_rollout_ref.actor.ppo_mini_batch_size=$TRAIN_BATCH_SIZE   # one update per batch: on-policy
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$TOKENS_PER_GPU
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.tensor_model_parallel_size=$ROLLOUT_TP
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5
    actor_rollout_ref.rollout.max_model_len=$(( MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH + 1 ))
    distillation.n_gpus_per_node=$TEACHER_GPUS
    distillation.nnodes=$NNODES
    distillation.teacher_models.teacher_model.model_path="$TEACHER_MODEL"
    distillation.teacher_models.teacher_model.inference.name=vllm
    distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=$TEACHER_TP
    distillation.teacher_models.teacher_model.inference.gpu_memory_utilization=0.5
    distillation.teacher_models.teacher_model.inference.max_model_len=$(( MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH + 1 ))
    trainer.n_gpus_per_node=$(( NGPUS_PER_NODE - TEACHER_GPUS ))
    trainer.nnodes=$NNODES
    trainer.val_before_train=True
    trainer.logger='["console"]'
    trainer.project_name=gopd_verl
    trainer.experiment_name=exopd_lam1.25
)

python3 -m verl.trainer.main_ppo "${GOPD[@]}" "${RUN[@]}" "$@"
