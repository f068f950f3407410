"""The embedded stdlib corpus: subsets, docs extraction, split by file, and a small real build."""
import numpy as np

from trinity_jax.config import from_config_dict
from trinity_jax.data import build_data
from trinity_jax.data.corpus import in_validation, is_test_path, module_docs, resolve_source


def test_stdlib_subsets_partition_the_files():
    every = {f[0] for f in resolve_source("all", "stdlib").files}
    lib = {f[0] for f in resolve_source("lib", "stdlib:lib").files}
    tests = {f[0] for f in resolve_source("tests", "stdlib:tests").files}
    assert len(every) > 500 and lib and tests
    assert lib | tests == every and not lib & tests
    assert "textwrap.py" in lib and "json/decoder.py" in lib
    assert any(f.startswith("test/test_") for f in tests)
    assert not any("site-packages" in f or "__pycache__" in f for f in every)
    assert is_test_path("unittest/test/test_case.py") and not is_test_path("unittest/case.py")
    assert {f[0] for f in resolve_source("e", "stdlib:email").files} <= lib | tests
    assert resolve_source("d", "stdlib:docs").files == resolve_source("lib", "stdlib:lib").files


def test_docs_extraction_and_split_by_file():
    src = 'class A:\n    """A thing."""\n    def go(self, x=1):\n        """Go far."""\n' \
          'def _hidden():\n    """no"""\n"""not a docstring"""\n'
    doc = module_docs("pkg.mod", '"""The module."""\n' + src)
    assert doc == ("Module pkg.mod\n\nThe module.\n\n\nclass pkg.mod.A\n\nA thing.\n\n\n"
                   "pkg.mod.A.go(self, x=1)\n\nGo far.")
    keys = [f"m{i}.py" for i in range(4000)]
    frac = np.mean([in_validation(k, 0.1) for k in keys])
    assert 0.08 < frac < 0.12
    assert in_validation("textwrap.py", 0.5) == in_validation("textwrap.py", 0.5)


def test_small_real_stdlib_build(tmp_path):
    cfg = from_config_dict({
        "model": {"vocab_size": 512},
        "data": {"sources": {"json": "stdlib:json", "docs": "stdlib:tomllib"},
                 "cache_dir": str(tmp_path), "val_fraction": 0.2},
        "train": {"steps": 3, "batch_size": 2, "seq_len": 64}})
    dm = build_data(cfg, str(tmp_path), log=lambda m: None)
    b = dm.train.next_batch(2)
    text = dm.tokenizer.decode(b["inputs"].reshape(-1))
    assert "def " in text or "import" in text or "class" in text
    assert dm.shards["json"].manifest["source"]["kind"] == "stdlib:prefix"
    assert 2.0 < dm.unigram_entropy < np.log(512)
