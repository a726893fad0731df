"""Real weights: all-MiniLM-L6-v2 with LoRA-XS on the paper's targets and a trained head, moved
to PyTorch both ways (a PEFT LoRA on BertForSequenceClassification, and a merged transformers
folder with its tokenizer); both give our logits on real sentences."""

import jax
import numpy as np
import pytest

import loraxs_jax as lx
from loraxs_jax.experiments.assets import asset_path
from loraxs_jax.interop import export_hf, export_peft
from loraxs_jax.models import encoder

SENTENCES = ["a gripping, beautifully acted film", "the plot is thin and the jokes fall flat",
             "not bad at all"]


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    folder = asset_path("minilm", fetch=True)
    config, base = encoder.load_encoder(folder, num_labels=2)
    cfg = lx.LoraXSConfig(rank=8, alpha=16.0, r_std=0.2, targets=encoder.PAPER_TARGETS,
                          trainable=(r"^classifier/",))
    params = lx.apply(base, cfg, jax.random.key(0))
    params["classifier"]["kernel"] = params["classifier"]["kernel"] * 3.0   # a "trained" head
    batch = AutoTokenizer.from_pretrained(folder)(SENTENCES, padding=True, return_tensors="np")
    ours = np.asarray(encoder.Encoder(config).apply(
        {"params": lx.merge(params)}, batch["input_ids"], batch["attention_mask"],
        batch["token_type_ids"]))
    return folder, config, base, params, cfg, batch, ours


def _torch(model, batch):
    import torch

    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


@pytest.mark.slow
def test_peft_on_minilm(minilm, tmp_path):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    folder, config, base, params, cfg, batch, ours = minilm
    out = export_peft(params, config, tmp_path / "peft", cfg, base_model_name_or_path=str(folder))
    torch_base = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    got = _torch(PeftModel.from_pretrained(torch_base, out).eval(), batch)
    diff = float(np.abs(got - ours).max())
    print(f"MiniLM PEFT vs ours max |Δlogit| {diff:.2e}")
    assert diff <= 1e-4
    adapted_effect = np.abs(ours - np.asarray(encoder.Encoder(config).apply(
        {"params": {**lx.merge(params), "encoder": base["encoder"]}}, batch["input_ids"],
        batch["attention_mask"], batch["token_type_ids"]))).max()
    assert adapted_effect > 1e-2                     # the LoRA part matters, not just the head


@pytest.mark.slow
def test_hf_folder_of_merged_minilm(minilm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, config, _, params, _, batch, ours = minilm
    out = export_hf(params, config, tmp_path / "hf", tokenizer=folder, base_config=folder)
    tok = AutoTokenizer.from_pretrained(out)
    again = tok(SENTENCES, padding=True, return_tensors="np")
    assert all(np.array_equal(again[k], batch[k]) for k in batch)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True)
    assert not any(info.values()), info
    diff = float(np.abs(_torch(model.eval(), again) - ours).max())
    print(f"MiniLM transformers(exported) vs ours max |Δlogit| {diff:.2e}")
    assert diff <= 1e-4
