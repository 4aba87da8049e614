"""Each T5Gemma / T5Gemma 2 preset in gin/models builds a model of the published size.

The published counts: T5Gemma's are the released checkpoints' totals (both stacks' embeddings, head tied to the
decoder's); T5Gemma 2's are the text model's (one shared embedding plus the end-of-image vector), the released
totals less the 417M vision tower. A count that matches pins vocabulary, widths, depths, heads and tying.
"""

import jax
import pytest

from dss_jax import configs, model

PUBLISHED = {
    "t5gemma_s_s": 312_517_632,
    "t5gemma_b_b": 591_490_560,
    "t5gemma_l_l": 1_241_761_792,
    "t5gemma_ml_ml": 2_200_345_344,
    "t5gemma_xl_xl": 3_766_980_608,
    "t5gemma_2b_2b": 5_596_853_760,
    "t5gemma_9b_2b": 12_292_375_296,
    "t5gemma_9b_9b": 20_333_401_088,
    # KerasHub's totals (953,800,816 / 2,417,966,192 / 8,180,020,080) less the SigLIP tower (416,866,032), the
    # projector (1152 d + 1152), KerasHub's second copy of the 262144 x d embedding and, for 4B only (its count is
    # newer), KerasHub's two end-of-image vectors; plus the one end-of-image vector that the HF model has
    "t5gemma2_270m_270m": 368_424_192 + 640,
    "t5gemma2_1b_1b": 1_697_782_016 + 1152,
    "t5gemma2_4b_4b": 7_089_110_016 + 2560,
}


def test_every_gemma_preset_is_listed():
    assert sorted(n for n in configs.model_names() if "gemma" in n) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_the_published_parameter_count(name):
    cfg = configs.model_config(name, scan_layers=True)  # one traced layer per stack: the same count, faster
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))
    assert model.count_params(shapes) == PUBLISHED[name]


def test_preset_layer_patterns():
    t5g, t5g2 = configs.model_config("t5gemma_b_b"), configs.model_config("t5gemma2_1b_1b")
    assert t5g.encoder.layer_types[:2] == ("sliding_attention", "full_attention")
    assert t5g2.decoder.layer_types[5] == "full_attention" and t5g2.decoder.layer_types[:5] == ("sliding_attention",) * 5
    assert t5g.decoder_start_token_id == t5g2.decoder_start_token_id == 2
