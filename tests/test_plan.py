"""perl_jax.plan: the analytic estimate by hand, compiled figures against an independent compile,
the verdict, and bad input.

The compiled tests plan the embedded default PPO config (tiny synthetic model) on ``cpu-8``,
the 8 host CPU devices of conftest.py, and compile two of its phases (the sampler and the value
model's update, the cheaper of the two update programs) to keep the file fast; the independent
side builds real random weights, shards them with `perl_jax.sharding` and compiles the
trainers' functions itself.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import config, sampling, sharding
from perl_jax.lora import LoraConfig
from perl_jax.models import ModelConfig, Transformer
from perl_jax.plan import estimate as est
from perl_jax.plan import topology
from perl_jax.plan.__main__ import cli
from perl_jax.plan.models import synthetic_policy_config
from perl_jax.trainers import common, ppo

from tests.helpers import random_adapters, random_params

GiB = 2 ** 30
COMPILED = ("generate", "update/value")


# --- The analytic estimate against a hand computation ----------------------------------------

TINY = dict(family="llama", vocab_size=10, embed_dim=8, num_layers=2, num_heads=2,
            num_kv_heads=1, head_dim=4, mlp_dim=16, max_positions=64)
QV = LoraConfig(rank=2, targets=(r"attn/(q|v)/kernel$",))


def test_estimate_formulas_by_hand():
  cfg = ModelConfig(**TINY)
  # Per layer: q 8x8, k 8x4, v 8x4, o 8x8 (192); gate, up, down 3 x 8x16 (384); two norms (16).
  # Plus the final norm (8), embedding and untied head (2 x 10x8).
  assert cfg.num_params() == 2 * (192 + 384 + 16) + 8 + 160 == 1352
  n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(
      jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, 2), jnp.int32)))))
  assert n_params == 1352
  # LoRA r=2 on q (8 -> 8) and v (8 -> 4): 2 x (8 + 8) + 2 x (8 + 4) = 56 per layer.
  assert est.adapter_params(cfg, QV) == 112
  # On fsdp=2: A factors (input side = embed) halve, B factors (heads) do not:
  # 2 x (4 + 8) + 2 x (4 + 4) = 40 per layer.
  mesh = est.Mesh(fsdp=2)
  assert est.adapter_params(cfg, QV, mesh) == 80
  scalar = cfg.replace(head="scalar")
  assert est.trainable_params(scalar, QV, mesh) == 80 + 8 / 2  # + the head, split over fsdp
  assert est.trainable_params(cfg, None, mesh) == 1352 / 2  # full fine-tuning
  # KV cache: 2 (k, v) x 2 layers x 3 rows x 1 KV head x 4 x 5 slots x 4 bytes.
  assert est.kv_cache_bytes(cfg, rows=3, length=5) == 960
  # Training activations per token and layer: 4 x (2*8 + 2*(2+1)*4 + 5*16) = 480 for matmul
  # inputs/outputs and the gated MLP's five F-wide tensors, 8*8 = 64 for the float32 norm inputs,
  # 2 heads x 5 keys x (4 + 4) = 80 for the attention probabilities: 624 per layer. One layer's
  # gradients: 4 x (3*16 + 2*8) + 80 = 336. Adapters: 4 kernels x r 2 x 4 bytes = 32.
  # (624 x 2 layers + 336 + 32) x 15 tokens = 24240, plus the logits five times:
  # 5 x 3 rows x 2 positions x 10 x 4 = 1200.
  assert est.train_activation_bytes(cfg, QV, rows=3, length=5, logit_positions=2) == 25440
  # Forward one layer at a time: 4 x (2*8 + 2*16) + 2 x 5 x 8 = 272 per token x 15 = 4080,
  # plus the logits three times: 3 x 3 x 1 x 10 x 4 = 360.
  assert est.forward_activation_bytes(cfg, rows=3, length=5, keys=5, logit_positions=1) == 4440
  # Folded float32 kernels: q (64) + v (32) per layer x 2 layers x 4 bytes; none in bfloat16.
  assert est.merged_kernel_bytes(cfg, QV) == 768
  assert est.merged_kernel_bytes(cfg.replace(param_dtype="bfloat16"), QV) == 0
  held = est.state([cfg], [est.Model(cfg, QV)], [], mesh)
  assert (held.params, held.trainable, held.optimizer) == (1352 * 4 / 2, 80 * 4, 2 * 80 * 4)
  # Sampling 2 samples for 2 prompts of 3 tokens, 2 new tokens, on fsdp=2: the cache of 4 rows
  # x 5 slots (1280 bytes) over 2 batch shards; the folded kernels (768 / 2), the weights
  # gathered for the decode loop (1352 x 4), and the larger of the prefill (2 x 3 tokens x
  # (192 + 2 heads x 3 keys x 8) = 1440) and a decode step (4 rows x (192 + 2 x 5 x 8) + the
  # logits 3 x 4 x 10 x 4 + 9 bytes x 4 rows x 2 steps = 1640), over 2 batch shards.
  kv, other = est.generate(est.Model(cfg, QV), 2, 2, 3, 2, mesh)
  assert (kv, other) == (640, 384 + 5408 + 1640 / 2)
  # A minibatch step: activations over data x fsdp = 2 batch shards, plus 3 x trainable.
  assert est.update(est.Model(cfg, QV), 3, 5, 2, mesh) == 25440 / 2 + 3 * 320


# --- Compiled figures against an independent compile -----------------------------------------


@pytest.fixture(scope="module")
def ppo_plan():
  import perl_jax.plan as plan

  c = config.ppo_config()
  return c, plan.make_plan(c, topology.get("cpu-8"), "ppo_lora.py", only=COMPILED)


def _mesh():
  return sharding.make_mesh(1, 8, 1)


def _sharded_models(c):
  """The default config's policy and value models, built here from random weights (one base)
  and placed on the mesh: (policy, value) modules and their frozen and trainable trees."""
  cfg = synthetic_policy_config(c)
  lcfg = common.lora_from_config(c.lora)
  mesh = _mesh()
  place = lambda module, tree, collection: sharding.shard_params(
      tree, sharding.param_shardings(module, mesh, collection=collection))
  policy, value = Transformer(cfg, lora=lcfg), Transformer(cfg.replace(head="scalar"), lora=lcfg)
  base = place(policy, random_params(Transformer(cfg)), "params")
  value_base = {k: v for k, v in base.items() if k != "lm_head"}
  head = {"score": jax.device_put({"kernel": jnp.zeros((cfg.embed_dim, 1))},
                                  sharding.param_shardings(value, mesh)["score"])}
  trees = {"policy/frozen": {"params": base},
           "policy/trainable": {"lora": place(policy, random_adapters(policy, base), "lora")},
           "value/frozen": {"params": value_base},
           "value/trainable": {"lora": place(value, random_adapters(value, {**value_base, **head}),
                                             "lora"), "params": head}}
  return policy, value, trees


def _analysis(lowered) -> tuple[int, int, int, int]:
  m = lowered.compile().memory_analysis()
  return (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
          m.temp_size_in_bytes)


def _planned(plan, name):
  p = next(p for p in plan.phases if p.name == name)
  assert p.compiled is not None, f"{name} was not compiled"
  return p


def test_plan_reports_the_memory_analysis_of_the_trainers_programs(ppo_plan):
  c, plan = ppo_plan
  policy, value, trees = _sharded_models(c)
  mesh = _mesh()
  batch = lambda x: jax.device_put(x, sharding.data_sharding(mesh))
  b, p, n = c.ppo.batch_size, c.data.max_prompt_len, c.rollout.max_new_tokens

  scfg = sampling.SamplingConfig(max_new_tokens=n, temperature=c.rollout.temperature)
  variables = common.variables(trees["policy/frozen"], trees["policy/trainable"])
  with sharding.activate(mesh):
    lowered = sampling._sample_jit.lower(
        policy, variables, batch(jnp.ones((b, p), jnp.int32)), batch(jnp.ones((b, p), bool)),
        jax.random.PRNGKey(0), cfg=scfg, eos_ids=(2,), pad_id=0)
  m = _planned(plan, "generate").compiled
  assert (m.argument, m.output, m.alias, m.temp) == _analysis(lowered)

  optimizer = common.make_optimizer(c.optimizer)
  trainable = trees["value/trainable"]
  state = ppo.TrainState(trainable, jax.jit(optimizer.init)(trainable))
  update = ppo.make_update_fn(c, policy, value, optimizer, optimizer).programs["value"]
  rows = b * c.rollout.num_samples
  data = dict(tokens=batch(jnp.ones((rows, p + n), jnp.int32)),
              mask=batch(jnp.ones((rows, p + n), bool)),
              response_mask=batch(jnp.ones((rows, n), bool)),
              values=batch(jnp.zeros((rows, n))), returns=batch(jnp.zeros((rows, n))))
  with sharding.activate(mesh):
    lowered = update.lower(state, trees["value/frozen"], data, jax.random.PRNGKey(0))
  m = _planned(plan, "update/value").compiled
  assert (m.argument, m.output, m.alias, m.temp) == _analysis(lowered)
  assert m.alias > 0  # the trainable state is donated and updated in place

  # Held state per device: the one synthetic base (shared by policy, reference, reward and
  # value) is one device's shards of the real arrays, counted once.
  device0 = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
  assert plan.resident["params"] == device0(trees["policy/frozen"])


def test_plan_peaks_and_the_estimate_of_held_state(ppo_plan):
  _, plan = ppo_plan
  names = [p.name for p in plan.phases]
  assert names == ["generate", "score", "update/policy", "update/value", "eval generate",
                   "eval score"]  # eval: 64 prompts > 32 training rows
  resident = plan.resident_total
  gen = _planned(plan, "generate")
  assert gen.peak(resident) == resident + gen.in_out + gen.compiled.temp + gen.compiled.code
  assert 0 < gen.kv_cache < gen.compiled.temp  # the cache lives inside the sampler's temp
  # The analytic held state matches the shard shapes of the default layout (within the few
  # scalar optimizer counts).
  e = plan.resident_estimate
  for key, value in (("params", e.params), ("trainable", e.trainable),
                     ("optimizer", e.optimizer)):
    assert plan.resident[key] == pytest.approx(value, rel=0.01), key
  assert gen.kv_cache == gen.estimate.kv_cache


def test_verdict_flips_with_the_memory_per_device(ppo_plan, capsys):
  _, plan = ppo_plan
  _, peak = plan.peak()
  small = dataclasses.replace(plan, topology=topology.with_memory(plan.topology, 0.9 * peak / GiB))
  large = dataclasses.replace(plan, topology=topology.with_memory(plan.topology, 1.1 * peak / GiB))
  assert not small.fits and large.fits
  # The command line: the estimate alone (--nocompile), verdict printed, exit 0 either way.
  c = config.ppo_config()
  assert cli(c, "cpu-8", memory_gb=1e-6, compile=False) == 0
  assert "does NOT fit" in capsys.readouterr().out
  assert cli(c, "cpu-8", memory_gb=100.0, compile=False) == 0
  out = capsys.readouterr().out
  assert "fits: peak" in out and "NOT" not in out


def test_sft_and_reward_plans_count_what_their_trainers_hold():
  import perl_jax.plan as plan

  for c in (config.sft_config(), config.reward_config()):
    c.lora.rank = 4
    p = plan.make_plan(c, topology.get("h100x8"))  # nothing compiles for a GPU here
    assert [x.name for x in p.phases] == ["train step"]
    assert p.phases[0].compiled is None and "no ahead-of-time GPU compiler" in p.target
    e = p.resident_estimate
    assert p.resident["trainable"] == pytest.approx(e.trainable, rel=0.01)
    assert p.resident["params"] == pytest.approx(e.params, rel=0.01)


def test_a_checkpoint_is_planned_from_its_config_json_alone(tmp_path):
  import json

  import perl_jax.plan as plan

  # A Llama checkpoint whose weights are not downloaded yet: config.json only.
  hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
            intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=96, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=128, tie_word_embeddings=False, hidden_act="silu",
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  c = config.ppo_config()
  c.policy.init = c.reward.init = str(tmp_path)  # policy, reference, reward, value: one base
  p = plan.make_plan(c, topology.get("h100x8"))
  cfg = ModelConfig(**{**TINY, "vocab_size": 96, "embed_dim": 64, "num_heads": 4,
                       "num_kv_heads": 2, "head_dim": 16, "mlp_dim": 128})
  assert p.resident["params"] == cfg.num_params() * 4 / 8  # fsdp=8, counted once
  assert p.resident_estimate.params == p.resident["params"]


# --- Bad input --------------------------------------------------------------------------------


def test_unknown_topology_exits_2_naming_it():
  proc = subprocess.run([sys.executable, "-m", "perl_jax.plan", "--config=configs/ppo_lora.py",
                         "--topology=tpu-v99"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "unknown topology 'tpu-v99'" in proc.stderr and "v5e-8" in proc.stderr
  assert proc.stdout == ""


def test_bad_batches_and_phase_names_exit_2(capsys):
  c = config.ppo_config()
  c.ppo.batch_size = 12  # 12 prompts over 8 batch shards
  assert cli(c, "cpu-8", compile=False) == 2
  assert "config.ppo.batch_size" in capsys.readouterr().err
  assert cli(config.ppo_config(), "cpu-8", only=("update",)) == 2  # not a phase name
  assert "--phases: update not among" in capsys.readouterr().err
  with pytest.raises(topology.TopologyError, match="cpu-16"):
    topology.target_devices(topology.get("cpu-16"))  # this process has 8 host devices
