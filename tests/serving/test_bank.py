"""The adapter bank: checks as load_adapter's (a refused file changes nothing), rank padding,
slots and LRU with no recompilation, memory per adapter, the memory-mapped store."""

import dataclasses

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import loraxs_jax as lx
from loraxs_jax.models import decoder as dec
from loraxs_jax.serving import (
    BASE,
    AdapterBank,
    AdapterDirectory,
    AdapterStore,
    BankError,
    BankFull,
)
from loraxs_jax.tree import adapter_key

Q0 = "model/layers_0/self_attn/q_proj/kernel"


def _snapshot(bank):
    return {k: np.asarray(v) for k, v in bank.state.items()}, bank.resident


def test_wrong_base_wrong_config_and_unpaddable_rank_are_refused_unchanged(decoder_zoo, tmp_path):
    z = decoder_zoo
    bank = AdapterBank(z.base, z.cfg, 4)
    bank.load("a0", z.path("a0"))
    before, resident = _snapshot(bank)
    other_base = dec.init_params(z.config, jax.random.key(9))
    lx.save_adapter(tmp_path / "foreign", lx.apply(other_base, z.cfg, 0), z.cfg)
    fewer = dataclasses.replace(z.cfg, targets=(r"self_attn/(q|v)_proj/kernel$",))
    lx.save_adapter(tmp_path / "fewer", lx.apply(z.base, fewer, 0), fewer)
    rand = dataclasses.replace(z.cfg, rank=2, svd_method="randomized")
    lx.save_adapter(tmp_path / "rand2", lx.apply(z.base, rand, 0), rand)
    big = dataclasses.replace(z.cfg, rank=6)
    lx.save_adapter(tmp_path / "big", lx.apply(z.base, big, 0), big)
    cases = {"foreign": "trained on a different base model",
             "fewer": r"cannot share this bank's bases: targets",
             "rand2": r"cannot share this bank's bases: svd_method",
             "big": r"rank 6 at .* above the bank's 4"}
    for name, why in cases.items():
        with pytest.raises(BankError, match=why):
            bank.load(name, tmp_path / f"{name}.safetensors")
        after, res = _snapshot(bank)
        assert res == resident and all(np.array_equal(after[k], before[k]) for k in before)
    # a rank-2 randomized adapter in a rank-2 randomized bank is fine; padded it is not
    bank_r = AdapterBank(z.base, dataclasses.replace(z.cfg, svd_method="randomized"), 4)
    with pytest.raises(BankError, match="zero-padding R is exact only"):
        bank_r.load("rand2", tmp_path / "rand2.safetensors")
    with pytest.raises(BankError, match="not valid"):
        bank.load("../etc", z.path("a1"))
    with pytest.raises(BankError, match="reserved"):
        bank.load(BASE, z.path("a1"))


def test_rows_hold_alpha_over_r_times_r_padded_with_zeros(decoder_zoo):
    z = decoder_zoo
    bank = AdapterBank(z.base, z.cfg, 4)
    slot = bank.load("s2", z.path("s2"))
    stored = load_file(z.path("s2"))["loraxs_R/r2"]        # (matrices, 2, 2), sorted paths
    row = np.asarray(bank.state[adapter_key(Q0, "R")][slot])
    names = sorted(t.name for t in bank.targets)
    np.testing.assert_array_equal(row[:2, :2], stored[names.index(Q0)] * np.float32(3.0 / 2))
    assert not row[2:].any() and not row[:, 2:].any()
    assert not any(np.asarray(v[0]).any() for v in bank.state.values())   # slot 0: R = 0


def test_slots_lru_capacity_and_no_recompilation(decoder_zoo):
    z = decoder_zoo
    bank = AdapterBank(z.base, z.cfg, 3, source=AdapterDirectory(z.folder))   # base + 2
    assert list(bank.ensure(["a0", "a1", BASE, "a0"])) == [1, 2, 0, 1]
    bank.ensure(["a1"])                                     # a0 is now least recently used
    assert list(bank.ensure(["a2"])) == [1]                 # a2 takes a0's slot
    compiled = bank.scatter_programs()                      # the k=1 and k=2 buckets
    assert set(bank.resident) == {BASE, "a1", "a2"}
    names = sorted(t.name for t in bank.targets)
    stored = load_file(z.path("a2"))["loraxs_R/r4"][names.index(Q0)]
    np.testing.assert_array_equal(np.asarray(bank.state[adapter_key(Q0, "R")][1]),
                                  stored * np.float32(8.0 / 4))
    with pytest.raises(BankFull, match="2 more adapters do not fit.* 3 needed by this batch"):
        bank.ensure(["a0", "s2", "a1"])
    with pytest.raises(BankError, match="unknown adapter 'nope'"):
        bank.ensure(["nope"])
    bank.unload("a2")
    assert "a2" not in bank and not np.asarray(bank.state[adapter_key(Q0, "R")][1]).any()
    assert bank.load("s2") == 1                             # pinned: ensure never evicts it
    bank.ensure(["a0"])                                     # evicts a1, the LRU
    assert set(bank.resident) == {BASE, "s2", "a0"}
    with pytest.raises(BankFull, match="1 more adapters do not fit"):
        bank.ensure(["a0", "a1"])
    assert bank.scatter_programs() == compiled              # loads and unloads: no compile
    with pytest.raises(BankError, match="cannot be unloaded"):
        bank.unload(BASE)


def test_memory_per_adapter_is_r2_matrices_4_plus_head(decoder_zoo, encoder_zoo):
    d = AdapterBank(decoder_zoo.base, decoder_zoo.cfg, 2)
    assert d.bytes_per_adapter() == 2 * 7 * 4 ** 2 * 4
    e = AdapterBank(encoder_zoo.base, encoder_zoo.cfg, 2)
    h = encoder_zoo.config.hidden_size
    assert e.bytes_per_adapter() == 2 * 4 * 4 ** 2 * 4 + (h * 3 + 3) * 4
    assert sum(v.nbytes for v in e.state.values()) == 2 * e.bytes_per_adapter()


def test_store_serves_the_same_rows_and_refuses_another_bank(decoder_zoo, tmp_path):
    z = decoder_zoo
    ref = AdapterBank(z.base, z.cfg, 5, source=AdapterDirectory(z.folder))
    store = AdapterStore.create(tmp_path / "store", ref, ((n, z.path(n)) for n in z.names),
                                len(z.names))
    assert len(store) == 4 and "s2" in store
    bank = AdapterBank(z.base, z.cfg, 5, source=AdapterStore(tmp_path / "store"))
    order = ["s2", "a1", "a0", "a2"]
    assert list(bank.ensure(order)) == list(ref.ensure(order))
    for k in ref.state:
        np.testing.assert_array_equal(np.asarray(bank.state[k]), np.asarray(ref.state[k]))
    other = dec.init_params(z.config, jax.random.key(9))
    with pytest.raises(BankError, match="packed for another bank"):
        AdapterBank(other, z.cfg, 5, source=AdapterStore(tmp_path / "store"))
    # rows come straight from the file, in the order asked, repeats included
    direct = np.load(tmp_path / "store" / "rows.npy")
    names = store.names()
    want = direct[[names.index(n) for n in ("a2", "s2", "a2")]]
    np.testing.assert_array_equal(store.rows(ref, ["a2", "s2", "a2"]), want)
    with pytest.raises(BankError, match="unknown adapter 'nope'"):
        store.rows(ref, ["nope"])
    rows_file = tmp_path / "store" / "rows.npy"          # cut short: refused by name
    opened = AdapterStore(tmp_path / "store")
    rows_file.write_bytes(rows_file.read_bytes()[:-8])
    with pytest.raises(BankError, match="row 3 is cut short"):
        opened.rows(ref, [names[3]])
    with pytest.raises(BankError, match="rows.npy cannot be read"):
        AdapterStore(tmp_path / "store")
