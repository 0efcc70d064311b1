"""Trainable tokens (`trainable_token_indices`) in the NNX, Equinox and Haiku front-ends, against the linen path.

Each front-end gets the twin of `tests.test_tokens.TiedLM` (an embedding, a LoRA `proj`, a tied head) with the linen
model's weights and the same moved adapter and rows: its forward equals `jlora.apply`'s, gradients reach the rows
and not the table, its merge equals its factored forward, and PEFT's files go through its params tree both ways.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora import nnx as jnnx
from jlora.formats.peft.api import load_peft, save_peft
from tests.models.helpers import lora_forward
from tests.test_tokens import DIM, IDS, VOCAB, TiedLM, _close, _moved

pytestmark = pytest.mark.usefixtures("float32_matmuls")  # tests/conftest.py


@pytest.fixture(scope="module")
def linen():
  """`(base, config, moved, x, logits, fresh)`: the linen TiedLM's base, its adapter and rows moved off zero, inputs
  holding both trained ids, `jlora.apply`'s logits, and what `jlora.init` made."""
  model = TiedLM()
  x = jnp.array([[1, 3, 5, 11, 3], [2, 2, 11, 0, 7]], jnp.int32)
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices=list(IDS), init_lora_weights=False)
  fresh = jlora.init(jax.random.key(1), model, base, config, x)
  moved = _moved(fresh, config)
  return base, config, moved, x, np.asarray(lora_forward(model, moved, config, x)), fresh


def _rows_only(table_before, table_after):
  """The rows in which two tables differ."""
  return tuple(np.flatnonzero(np.abs(np.asarray(table_after) - np.asarray(table_before)).sum(axis=1)))


def _errors(init):
  """The errors linen gives, from a front-end's `init(config)`."""
  for indices, match in [([2, 13, 40], r"'embed_tokens'.*ids \[13, 40\].*vocabulary of 13 rows"),
                         ({"proj": [1]}, r"'proj' \(dense\), which is not an embedding"),
                         ({"nowhere": [1]}, "matches no module")]:
    with pytest.raises(ValueError, match=match):
      init(jlora.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices=indices))
  with pytest.raises(ValueError, match=r"both in `target_modules`.*`trainable_token_indices`"):
    init(jlora.LoraConfig(r=2, target_modules=["proj", "embed_tokens"], trainable_token_indices=[1]))


def _peft_round_trip(tmp_path, params, base_params, config):
  """`save_peft` then `load_peft` of a front-end's params tree (Flax paths as PyTorch names): `(params, config)`."""
  save_peft(tmp_path, None, params, config, name_map="flax")
  loaded, cfg = load_peft(tmp_path, None, base_params, name_map="flax")
  assert cfg.trainable_token_indices == {"embed_tokens": IDS}
  return loaded, cfg


# ------------------------------------------------------------------------------------------------- NNX
class NnxTied(nnx.Module):
  """TiedLM in NNX: the tied head is `nnx.Embed.attend`."""

  def __init__(self, base):
    self.embed_tokens = nnx.Embed(VOCAB, DIM, rngs=nnx.Rngs(0))
    self.proj = nnx.Linear(DIM, DIM, rngs=nnx.Rngs(0))
    self.embed_tokens.embedding.set_value(base["embed_tokens"]["embedding"])
    self.proj.kernel.set_value(base["proj"]["kernel"])
    self.proj.bias.set_value(base["proj"]["bias"])

  def __call__(self, ids):
    return self.embed_tokens.attend(jnp.tanh(self.proj(self.embed_tokens(ids))))


def test_nnx_init_forward_gradients_and_merge_equal_linens(linen):
  base, config, moved, x, logits, fresh = linen
  model = NnxTied(base)
  lora = jnnx.init(jax.random.key(1), model, config, x)
  assert type(lora.embed_tokens).__name__ == "TokensEmbed" and isinstance(lora.embed_tokens, nnx.Embed)
  made = jnnx.to_params(lora)  # the leaves jlora.init gives the linen twin: the same draws, a zero (2, DIM) leaf
  assert jax.tree.structure(made) == jax.tree.structure(fresh)
  jax.tree.map(np.testing.assert_array_equal, made, fresh)
  assert made["embed_tokens"]["trainable_tokens"].shape == (len(IDS), DIM)

  lora = jnnx.from_params(model, moved, config)
  _close(lora(x), logits)
  _close(nnx.jit(lambda m: m(x))(lora), logits)
  merged = jnnx.merge(lora)
  assert type(merged.embed_tokens) is nnx.Embed and "trainable_tokens" not in vars(merged.embed_tokens)
  assert _rows_only(base["embed_tokens"]["embedding"], merged.embed_tokens.embedding[...]) == IDS
  _close(merged(x), logits)
  back = jnnx.unmerge(merged, lora)
  _close(back.embed_tokens.embedding[...], base["embed_tokens"]["embedding"], 1e-6)
  _close(back(x), logits)

  _, trainable, _ = jnnx.split(lora)
  assert set(trainable["embed_tokens"]) == {"trainable_tokens"}  # the table is in the frozen half
  table = np.asarray(lora.embed_tokens.embedding[...])
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, jnnx.Trainable))(lora)
  assert set(grads["embed_tokens"]) == {"trainable_tokens"}
  assert np.all(np.abs(np.asarray(grads["embed_tokens"]["trainable_tokens"][...])).sum(axis=1) > 0)
  opt = jnnx.optimizer(lora, optax.sgd(0.1))
  opt.update(lora, grads)
  np.testing.assert_array_equal(lora.embed_tokens.embedding[...], table)
  assert _rows_only(table, jnnx.merge(lora).embed_tokens.embedding[...]) == IDS


def test_nnx_errors_are_linens_and_peft_files_go_through_its_params(linen, tmp_path):
  base, config, moved, x, logits, _ = linen
  model = NnxTied(base)
  _errors(lambda cfg: jnnx.init(jax.random.key(1), model, cfg, x))
  params, cfg = _peft_round_trip(tmp_path, jnnx.to_params(jnnx.from_params(model, moved, config)),
                                 jnnx.to_params(model), config)
  _close(jnnx.from_params(model, params, cfg)(x), logits)
  wrong = {**moved, "proj": {**moved["proj"], "trainable_tokens": jnp.zeros((1, DIM))}}
  with pytest.raises(ValueError, match=r"both in `target_modules`.*`trainable_token_indices`"):
    jnnx.from_params(model, wrong, jlora.LoraConfig(r=2, target_modules=["proj"],
                                                    trainable_token_indices={"embed_tokens": IDS, "proj": [1]}))


# ------------------------------------------------------------------------------------------------- Equinox
def _equinox():
  eqx = pytest.importorskip("equinox")

  class EqxTied(eqx.Module):
    """TiedLM in Equinox, one example `(T,)`: the tied head reads the table by hand (`weight @ h`)."""

    embed_tokens: eqx.nn.Embedding
    proj: eqx.nn.Linear

    def __init__(self, base):
      self.embed_tokens = eqx.nn.Embedding(weight=base["embed_tokens"]["embedding"])
      proj = eqx.nn.Linear(DIM, DIM, key=jax.random.key(0))
      self.proj = eqx.tree_at(lambda m: (m.weight, m.bias), proj, (base["proj"]["kernel"].T, base["proj"]["bias"]))

    def __call__(self, ids):
      h = jnp.tanh(jax.vmap(self.proj)(jax.vmap(self.embed_tokens)(ids)))
      return h @ self.embed_tokens.weight.T

  return eqx, EqxTied


def _eqx_params(moved):
  """The linen twin's moved params in Equinox's tree: `(out, in)` weight, broadcast-layout adapter."""
  p = moved["proj"]
  return {"embed_tokens": dict(moved["embed_tokens"]),
          "proj": {"weight": p["kernel"].T, "bias": p["bias"], "lora_a": p["lora_a"][None],
                   "lora_b": p["lora_b"].T[:, None, :]}}


def test_equinox_init_forward_gradients_and_merge_equal_linens(linen):
  eqx, EqxTied = _equinox()
  from jlora import equinox as jeqx

  base, config, moved, x, logits, _ = linen
  model = EqxTied(base)
  fresh = jeqx.init(jax.random.key(1), model, config)
  assert isinstance(fresh.embed_tokens, jeqx.TokensEmbedding) and fresh.embed_tokens.ids == IDS
  assert fresh.embed_tokens.trainable_tokens.shape == (len(IDS), DIM)
  assert not np.any(np.asarray(fresh.embed_tokens.trainable_tokens))
  assert fresh.embed_tokens.base.weight is model.embed_tokens.weight  # the table is not copied
  without = eqx.tree_at(lambda m: m.embed_tokens, fresh, fresh.embed_tokens.base)  # zero rows change nothing
  np.testing.assert_array_equal(jax.vmap(fresh)(x), jax.vmap(without)(x))

  lora = jeqx.from_params(model, _eqx_params(moved), config)
  _close(jax.vmap(lora)(x), logits)
  _close(eqx.filter_jit(jax.vmap(lambda m, ids: m(ids), in_axes=(None, 0)))(lora, x), logits)
  merged = jeqx.merge(lora)
  assert type(merged.embed_tokens) is eqx.nn.Embedding
  assert _rows_only(base["embed_tokens"]["embedding"], merged.embed_tokens.weight) == IDS
  _close(jax.vmap(merged)(x), logits)

  trainable, frozen = eqx.partition(lora, jeqx.trainable_mask(lora, config))
  assert trainable.embed_tokens.base.weight is None and frozen.embed_tokens.trainable_tokens is None
  loss = lambda t: jnp.sum(jax.vmap(eqx.combine(t, frozen))(x) ** 2)  # noqa: E731
  grads = eqx.filter_jit(eqx.filter_grad(loss))(trainable)
  assert grads.embed_tokens.base.weight is None  # no table gradient is computed
  assert np.all(np.abs(np.asarray(grads.embed_tokens.trainable_tokens)).sum(axis=1) > 0)
  tx = optax.sgd(0.1)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  stepped = eqx.combine(eqx.apply_updates(trainable, updates), frozen)
  np.testing.assert_array_equal(stepped.embed_tokens.base.weight, base["embed_tokens"]["embedding"])
  assert _rows_only(base["embed_tokens"]["embedding"], jeqx.merge(stepped).embed_tokens.weight) == IDS


def test_equinox_errors_are_linens_and_peft_files_go_through_its_params(linen, tmp_path):
  _, EqxTied = _equinox()
  from jlora import equinox as jeqx

  base, config, moved, x, logits, _ = linen
  model = EqxTied(base)
  _errors(lambda cfg: jeqx.init(jax.random.key(1), model, cfg))
  lora = jeqx.from_params(model, _eqx_params(moved), config)
  params, cfg = _peft_round_trip(tmp_path, jeqx.to_params(lora), jeqx.to_params(model), config)
  _close(jax.vmap(jeqx.from_params(model, params, cfg))(x), logits)
  with pytest.raises(ValueError, match=r"where the model has a Linear, not eqx.nn.Embedding"):
    jeqx.from_params(model, {"proj": {"trainable_tokens": jnp.zeros((1, DIM))}},
                     jlora.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices={"proj": [1]}))


# ------------------------------------------------------------------------------------------------- Haiku
def _haiku():
  hk = pytest.importorskip("haiku")

  def tied(ids):
    """TiedLM in Haiku: the tied head reads `hk.Embed.embeddings` by hand."""
    embed = hk.Embed(VOCAB, DIM, name="embed_tokens")
    return jnp.tanh(hk.Linear(DIM, name="proj")(embed(ids))) @ embed.embeddings.T

  def untied(ids):
    """The lookup alone."""
    return hk.Linear(DIM, name="proj")(hk.Embed(VOCAB, DIM, name="embed_tokens")(ids))

  return hk, hk.transform(tied), hk.transform(untied)


def _hk_params(moved):
  e, p = moved["embed_tokens"], moved["proj"]
  return {"embed_tokens": {"embeddings": e["embedding"], "embeddings_trainable_tokens": e["trainable_tokens"]},
          "proj": {"w": p["kernel"], "b": p["bias"], "lora_a": p["lora_a"], "lora_b": p["lora_b"]}}


def test_haiku_forward_gradients_and_merge_equal_linens(linen):
  _, tied, untied = _haiku()
  from jlora import haiku as jhk

  base, config, moved, x, logits, _ = linen
  fresh = jlora.init_tree(jax.random.key(1), tied.init(jax.random.key(0), x), config)
  assert fresh["embed_tokens"]["embeddings_trainable_tokens"].shape == (len(IDS), DIM)
  params = _hk_params(moved)
  _close(jhk.apply(tied.apply, params, config, None, x), logits)
  _close(jax.jit(lambda p: jhk.apply(tied.apply, p, config, None, x))(params), logits)
  _close(tied.apply(jlora.merge(params, config), None, x), logits)
  # the lookup alone sees the rows (a correction of the looked-up vectors)
  _close(jhk.apply(untied.apply, params, config, None, x), untied.apply(jlora.merge(params, config), None, x))

  trainable, frozen = jlora.split(params, config)
  assert set(trainable["embed_tokens"]) == {"embeddings_trainable_tokens"} and "embeddings" in frozen["embed_tokens"]
  loss = lambda t: jnp.sum(jhk.apply(tied.apply, jlora.combine(t, frozen), config, None, x) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss))(trainable)
  assert np.all(np.abs(np.asarray(grads["embed_tokens"]["embeddings_trainable_tokens"])).sum(axis=1) > 0)
  tx = optax.sgd(0.1)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  stepped = jlora.combine(optax.apply_updates(trainable, updates), frozen)
  table = base["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(stepped["embed_tokens"]["embeddings"], table)
  assert _rows_only(table, jlora.merge(stepped, config)["embed_tokens"]["embeddings"]) == IDS


def test_haiku_errors_and_peft_files(linen, tmp_path):
  hk, tied, _ = _haiku()
  from jlora import haiku as jhk

  base, config, moved, x, logits, _ = linen
  params = _hk_params(moved)
  hk_base = {"embed_tokens": {"embeddings": base["embed_tokens"]["embedding"]},
             "proj": {"w": base["proj"]["kernel"], "b": base["proj"]["bias"]}}
  loaded, cfg = _peft_round_trip(tmp_path, params, hk_base, config)
  _close(jhk.apply(tied.apply, loaded, cfg, None, x), logits)
  skip = hk.transform(lambda ids: hk.Linear(DIM, name="proj")(jnp.ones(ids.shape + (DIM,))))
  with pytest.raises(ValueError, match=r"\['embed_tokens \(trainable tokens\)'\] were not used"):
    jhk.apply(skip.apply, params, config, None, x)
  both = {**params, "proj": {**params["proj"], "w_trainable_tokens": jnp.zeros((1, DIM))}}
  with pytest.raises(ValueError, match=r"'proj' is both in `target_modules`.*`trainable_token_indices`"):
    jhk.apply(tied.apply, both, jlora.LoraConfig(r=2, target_modules=["proj"],
                                                  trainable_token_indices={"embed_tokens": IDS, "proj": [1]}),
              None, x)

