"""medplib_jax/flops.py against hand-worked counts and XLA's own FLOP count of the LLM forward."""

import jax
import jax.numpy as jnp
import pytest

from configs import common
from medplib_jax import flops
from medplib_jax.config_loading import load_config
from medplib_jax.models.llama import LlamaForCausalLM

# Tiny LLM: width 128, 2 layers, 4 heads x 32, SwiGLU 344, vocabulary 1000 + 267 added = 1267.
B, L = 2, 16
T = B * L


def test_tiny_dense_llm_forward_hand_worked():
  llm = common.llm_config("tiny")
  got = flops.llm_forward(llm, common.moe_config(1), None, batch=B, seq_len=L)
  # q, k, v, o: four 128x128 matmuls on 32 tokens, 2 layers.
  assert got["attn_proj"] == 2 * 4 * (2 * 32 * 128 * 128) == 8_388_608
  # QK^T and PV: 2 x (2 * 16 * 16 * 128) per sequence and layer; 2 sequences, 2 layers.
  assert got["attn_scores"] == 2 * 2 * 2 * (2 * 16 * 16 * 128) == 524_288
  # gate, up (128 -> 344) and down (344 -> 128).
  assert got["ffn"] == 2 * 3 * (2 * 32 * 128 * 344) == 16_908_288
  assert got["lm_head"] == 2 * 32 * 128 * 1267 == 10_379_264
  assert got["router"] == 0 and got["lora"] == 0
  assert sum(got.values()) == 36_200_448


def test_moe_counts_active_expert_plus_router():
  llm = common.llm_config("tiny")
  dense = flops.llm_forward(llm, common.moe_config(1), None, batch=B, seq_len=L)
  moe = flops.llm_forward(llm, common.moe_config(2), None, batch=B, seq_len=L)
  assert moe["ffn"] == dense["ffn"]
  assert moe["router"] == 2 * (2 * 32 * 128 * 2)


def test_lora_adapter_flops():
  llm = common.llm_config("tiny")
  lora = common.lora_config(rank=8, targets=("q", "down"))
  got = flops.llm_forward(llm, common.moe_config(2), lora, batch=B, seq_len=L)
  # q: 128 -> 8 -> 128; down (active expert only): 344 -> 8 -> 128; 2 layers.
  assert got["lora"] == 2 * ((2 * 32 * 128 * 8 + 2 * 32 * 8 * 128) + (2 * 32 * 344 * 8 + 2 * 32 * 8 * 128))


def test_train_is_six_nt_plus_attention_when_everything_trains():
  cfg = load_config("configs/stage2_vqa.py:tiny", ["--config.lora.rank=0"])
  train = flops.train_step_flops(cfg, B, L, trainable_regexes=[".*"])
  fwd = flops.forward_flops(cfg.model, None, batch=B, seq_len=L)
  llm_keys = [k for k in fwd if k.startswith("llm_")]
  # 6 N T for the LLM matmuls plus 3x the forward attention (12 L d T^2 over a sequence).
  assert sum(train[k] for k in llm_keys) == pytest.approx(3 * sum(fwd[k] for k in llm_keys))
  # Frozen towers under stop_gradient: forward only.
  assert train["vision"] == fwd["vision"] and train["sam_encoder"] == fwd["sam_encoder"]


def test_stage4_frozen_weights_skip_weight_gradients():
  cfg = load_config("configs/stage4_moe.py:tiny")
  train = flops.train_step_flops(cfg, B, L)
  fwd = flops.forward_flops(cfg.model, cfg.lora, batch=B, seq_len=L)
  assert train["llm_ffn"] == 2 * fwd["llm_ffn"]        # frozen experts: activation grads only
  assert train["llm_lm_head"] == 3 * fwd["llm_lm_head"]  # trained in stage 4
  assert train["llm_lora"] == 3 * fwd["llm_lora"]
  assert train["projector"] == fwd["projector"]        # frozen, nothing trains below it
  assert train["sam_decoder"] == 3 * fwd["sam_decoder"]


def test_clip_vit_l_forward_hand_worked():
  # ViT-L/14-336: 577 tokens, 23 layers run (features after layer 23 of 24).
  per_layer = 2 * 577 * 1024 * (3 * 1024 + 1024 + 2 * 4096) + 4 * 577 * 577 * 1024
  patch = 2 * 576 * (14 * 14 * 3) * 1024
  assert flops.vision_forward(common.vision_config("7b"), 1) == patch + 23 * per_layer


def test_7b_llm_parameter_count_and_decode():
  model = common.model_config("7b", num_experts=1)
  # LLaMA-7B is 6.74 B parameters; the 267 added tokens add 2 * 267 * 4096 to embed + head.
  assert flops.llm_param_count(model) == 6_738_415_616 + 2 * 267 * 4096
  per_token = flops.decode_step_flops(model, batch=1, context=1)
  non_embedding = flops.llm_param_count(model) - 32267 * 4096 - 33 * 4096 * 2 + 4096
  assert per_token == pytest.approx(2 * non_embedding + 4 * 32 * 4096, rel=1e-3)


def test_mfu():
  assert flops.mfu(1e15, 2.0, 1e15, 1) == 0.5
  assert flops.mfu(8e15, 1.0, 1e15, 8) == 1.0
  with pytest.raises(ValueError):
    flops.mfu(1.0, 0.0, 1.0)


def test_llm_forward_matches_xla_cost_analysis():
  """XLA's count for the compiled tiny dense forward includes the elementwise work we leave out
  (RMSNorm, rotary, SiLU, softmax, masking: ~1 FLOP per element each, O(T·d) and O(H·T²)); at
  width 128 that is a few percent of the matmuls, so the model count must be within 10 % below
  XLA's and never above it."""
  llm = common.llm_config("tiny")
  llm.scan_layers = False  # XLA's cost analysis does not multiply a scanned body by its trip count
  model = LlamaForCausalLM(llm, common.moe_config(1), None, dtype=jnp.float32)
  ids = jnp.zeros((B, L), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
  fwd = lambda p, x: model.apply({"params": p}, input_ids=x)["logits"]
  cost = jax.jit(fwd).lower(params, ids).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  xla = float(cost["flops"])
  ours = sum(flops.llm_forward(llm, common.moe_config(1), None, batch=B, seq_len=L).values())
  assert 0.9 * xla <= ours <= xla, (ours, xla)
