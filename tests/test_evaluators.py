"""The shared pad-decode-cut path (dss-eval, dss-infer, dss-serve and the evaluators all use it)."""

import jax
import numpy as np
from factories import tiny_t5

from dss_jax import decoding, model

CFG = tiny_t5(
    vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16
)


def test_decode_and_cut_equals_each_row_decoded_alone_and_cut_at_its_eos():
    params = model.init_params(CFG, jax.random.PRNGKey(1))
    # EOS likely within a few steps, so some rows are cut and some run to the limit
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"].at[:, CFG.eos_token_id].add(0.25)
    rng = np.random.RandomState(0)
    rows = [rng.randint(2, CFG.vocab_size, size=rng.randint(2, 12)).astype(np.int32) for _ in range(7)]  # 7: a short last batch
    got = decoding.decode_and_cut(params, rows, CFG, length=12, batch_size=3, max_decode_length=8)
    want = []
    for r in rows:
        out = np.asarray(decoding.greedy_decode_reference(params, decoding.pad_rows([r], 1, 12), CFG, 8))[0].tolist()
        want.append(out[: out.index(CFG.eos_token_id)] if CFG.eos_token_id in out else out)
    assert got == want
    assert any(len(w) < 8 for w in want) and any(len(w) == 8 for w in want)  # both a cut row and a full-length one
