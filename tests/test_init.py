"""The public API: loraxs_jax.__all__ is exactly the README's list of verbs, and each works."""

import re

import loraxs_jax as lx


def test_all_equals_the_readme_list(repo):
    readme = (repo / "README.md").read_text()
    block = re.search(r"<!-- public-api -->(.*?)<!-- /public-api -->", readme, re.S)
    assert block, "README.md lacks the <!-- public-api --> list"
    names = re.findall(r"^\| `(\w+)` \|", block.group(1), re.M)
    assert sorted(names) == sorted(lx.__all__)
    assert len(lx.__all__) <= 12
    for name in lx.__all__:
        assert getattr(lx, name) is not None


def test_namespaces_are_reachable():
    assert callable(lx.nnx.apply) and callable(lx.nnx.merge) and callable(lx.nnx.call)
    assert callable(lx.parallel.make_mesh) and callable(lx.parallel.jit_train_step)
    assert callable(lx.io.adapter_info) and callable(lx.io.fingerprint)
