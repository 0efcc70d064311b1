"""summary(): counts, bytes, percentages; the seed's 512×64 example."""

import flax.linen as nn
import jax
import jax.numpy as jnp

import jlora


def test_seed_dense_example():
  model, x = nn.Dense(64), jnp.ones((1, 512))
  cfg = jlora.LoraConfig(r=8, target_modules=".*")
  params = jlora.init(jax.random.key(1), model, model.init(jax.random.key(0), x)["params"], cfg, x)
  s = jlora.summary(params, cfg)
  assert s.adapter_params == 4608 == s.trainable
  assert s.total == 512 * 64 + 64 + 4608
  assert s.trainable_bytes == 4608 * 4
  (row,) = s.rows
  assert row.base_params == 32768 and row.r == 8 and row.scale == 1.0
  assert round(100 * (1 - row.adapter_params / row.base_params)) == 86
  text = str(s)
  assert "86%" in text and "trainable params: 4,608 || all params: 37,440" in text
  assert abs(s.percent - 100 * 4608 / 37440) < 1e-9


def test_summary_counts_biases_and_saved_modules():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="classifier")(nn.Dense(16, name="body")(x))

  model, x = Net(), jnp.ones((1, 8))
  cfg = jlora.LoraConfig(r=2, target_modules=["body"], bias="lora_only", modules_to_save=["classifier"])
  params = jlora.init(jax.random.key(1), model, model.init(jax.random.key(0), x)["params"], cfg, x)
  s = jlora.summary(params, cfg)
  assert s.adapter_params == 2 * (8 + 16)
  assert s.trainable == s.adapter_params + 16 + (16 * 3 + 3)
