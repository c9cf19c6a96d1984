"""VQT's training recipe from the official code (andytu28/VQT): its defaults, query dropout only
in training (a mask of its own for every sample and every fused member), hyperparameters checked
at config time, and no feature standardisation of the tokens the frozen blocks read.

What the normalisation and the dropout compute is checked against the live timm model in
test_vqt_equivalence.py; here only when they act.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.adapters import VQT, FusedAdapters, VQTHparams
from pipeline.adapters.errors import AdapterConfigError
from pipeline.adapters.hparams import HparamValueError, parse_hparams
from pipeline.adapters.standardize import Standardizer
from tests.test_vqt_equivalence import build_vqt, plain_run, random_images, randomized_model


@pytest.fixture(scope="module")
def model_and_features():
    model = randomized_model("test_vit")
    features, _ = plain_run(model, random_images())
    return model, features


def test_defaults_are_the_official_recipe():
    hparams = VQTHparams()
    assert hparams.normalize == "per_block"  # official NORMALIZE_FEATS = True
    assert hparams.dropout == 0.1  # the official scripts' MODEL.H2T.DROPOUT


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, math.nan])
def test_dropout_outside_zero_to_one_is_refused_by_name(dropout):
    with pytest.raises(HparamValueError, match=r"'dropout' = .* expected a probability p with 0 <= p < 1"):
        VQTHparams(dropout=dropout)
    with pytest.raises(AdapterConfigError, match="'dropout'"):
        parse_hparams("vqt", VQTHparams, {"dropout": dropout})


def test_yaml_spellings_of_the_recipe_hparams():
    parsed = parse_hparams("vqt", VQTHparams, {"dropout": 0, "normalize": "cls"})
    assert parsed == VQTHparams(dropout=0.0, normalize="cls")
    for wrong in (True, "l2"):  # `normalize: true` is not one of the choices
        with pytest.raises(AdapterConfigError, match="'per_block', 'cls', 'none'"):
            parse_hparams("vqt", VQTHparams, {"normalize": wrong})


def test_standardisation_is_refused(model_and_features):
    model, features = model_and_features
    vqt = build_vqt(model, features)
    assert VQT.supports_standardize is False
    with pytest.raises(AdapterConfigError, match="standardize: false"):
        vqt.standardize_with(Standardizer({}, {}))


def test_a_store_kept_through_the_final_norm_is_refused(model_and_features):
    """backbone.through_final_norm: the cached block outputs are not what the next block reads."""
    from dataclasses import replace

    from tests.test_vqt_equivalence import layer_specs

    model, features = model_and_features
    specs = {name: replace(spec, through_final_norm=spec.block_index is not None and spec.block_index >= 0)
             for name, spec in layer_specs(model, features).items()}
    with pytest.raises(AdapterConfigError, match="through the backbone's final norm"):
        VQT(specs, 5, model.blocks, model.norm)


def test_dropout_is_active_in_training_and_off_in_eval(model_and_features):
    model, features = model_and_features
    vqt = build_vqt(model, features)
    without = build_vqt(model, features, dropout=0.0)
    without.load_state_dict(vqt.state_dict())

    with torch.no_grad():
        vqt.train()
        first, second = vqt(features), vqt(features)
        assert not torch.allclose(first, second), "two training steps drew the same masks"
        vqt.eval()
        # Off in eval: the very computation of an adapter without dropout, bit for bit.
        assert torch.equal(vqt(features), without.eval()(features))
        assert torch.equal(without.train()(features), without.eval()(features))


def test_each_fused_member_draws_its_own_mask(model_and_features):
    model, features = model_and_features
    vqt = build_vqt(model, features)
    fused = FusedAdapters([vqt, copy.deepcopy(vqt)])  # identical members
    with torch.no_grad():
        trained = fused.train()(features)
        evaluated = fused.eval()(features)
    assert not torch.allclose(trained[0], trained[1]), "fused members shared one dropout mask"
    torch.testing.assert_close(evaluated[0], evaluated[1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(evaluated[0], vqt.eval()(features), atol=1e-12, rtol=1e-12)


def test_a_fused_members_masks_follow_its_own_seed(model_and_features):
    """Two identical members given one seed draw the same masks, step after step; given
    their own seeds, other masks; a subset (a group split by pruning) goes on drawing them."""
    model, features = model_and_features
    vqt = build_vqt(model, features)
    same = FusedAdapters([vqt, copy.deepcopy(vqt)], seeds=[5, 5]).train()
    apart = FusedAdapters([copy.deepcopy(vqt), copy.deepcopy(vqt)], seeds=[5, 6]).train()
    with torch.no_grad():
        for _ in range(2):
            both, other = same(features), apart(features)
            assert torch.equal(both[0], both[1]) and torch.equal(both[0], other[0])
            assert not torch.allclose(other[0], other[1])
        kept = apart.subset(torch.tensor([1]))  # its stream is two draws in
        fresh = FusedAdapters([copy.deepcopy(vqt)], seeds=[6]).train()
        fresh(features), fresh(features)
        assert torch.equal(kept(features)[0], fresh(features)[0])


def test_a_store_vqt_cannot_use_says_what_to_extract(colour_store, tmp_path, image_folder, capsys):
    """On a ViT store without every block: "needs layer 'blocks.1' (did you mean 'blocks.5'?)";
    on a CNN's: "backbone_modules for adapter 'vqt' lacks norm; got a EfficientNet"."""
    from cache import open_store
    from pipeline.adapters import build_adapter
    from pipeline.cli import main
    from pipeline.runners.extract import run_extract
    from tests.conftest import tiny_config

    reader = open_store(colour_store)  # test_vit: embed, blocks.0, blocks.5 of 6 blocks
    with pytest.raises(AdapterConfigError, match=r"it needs 'embed' \(the input of block 0\) and blocks.0..blocks.5, all tokens; this "
                                                 r"store lacks \['blocks.1', 'blocks.2', 'blocks.3', 'blocks.4'\]\. Extract with "
                                                 r"backbone.layers: \[0, ..., 5\], backbone.block_input: true and store.tokens: all"):
        build_adapter("vqt", reader.layers, 3, backbone_modules=randomized_model("test_vit"))
    cnn = tiny_config(tmp_path, image_folder, "backbone.name=test_efficientnet", "backbone.layers=[-1]")
    run_extract(cnn)
    config = tmp_path / "train.yaml"
    config.write_text(f"store: {cnn.store.path}\noutput: {tmp_path / 'run'}\ntest_split: val\nadapters: [{{kind: vqt}}]\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "and this backbone (EfficientNet) has no `norm`: it needs a store of a ViT" in err
