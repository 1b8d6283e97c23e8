"""The causal-LM prune mechanics: how many MLP channels an amount keeps, which ones each criterion keeps,
and that the narrowed model is the model it came from minus those channels."""
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from edgekd.errors import BadInputError  # noqa: E402
from edgekd.lm.models import count_lm_params, lm_macs_per_token  # noqa: E402
from edgekd.prune.lm_stage import ROUND_TO, kept_width, narrow_mlps, narrowed  # noqa: E402


def llama(intermediate: int = 128, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=intermediate, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def blocks(n: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 96, (n, seq), generator=torch.Generator().manual_seed(1))


def test_a_ratio_keeps_the_nearest_whole_number_of_channel_blocks():
    m = llama(intermediate=256)
    assert kept_width(m, "ratio", 0.5) == 128
    assert kept_width(m, "ratio", 0.3) == 192  # 179.2 channels -> 6 blocks of 32
    assert kept_width(m, "ratio", 0.25) == 192
    assert kept_width(m, "ratio", 0.95) == ROUND_TO  # at least one block stays


@pytest.mark.parametrize("kind, count", [("target_params", count_lm_params), ("target_macs", lm_macs_per_token)])
def test_a_target_share_is_met_by_the_widest_block_count_within_it(kind, count):
    m = llama(intermediate=256)
    keep = kept_width(m, kind, 0.8)
    per_channel = 3 * 32 * 2  # gate and up rows and a down column in each of 2 layers of width 32
    assert keep % ROUND_TO == 0
    assert count(m) - (256 - keep) * per_channel <= 0.8 * count(m)  # met
    assert count(m) - (256 - keep - ROUND_TO) * per_channel > 0.8 * count(m)  # one block more would overshoot


def test_amounts_the_mlps_cannot_reach_or_that_remove_nothing_are_one_clear_line():
    m = llama(intermediate=256)
    with pytest.raises(BadInputError, match=r"prune.target_params 0.1: narrowing the student's MLPs to 32 channels "
                                            r"keeps 0\.\d+ of its parameters"):
        kept_width(m, "target_params", 0.1)
    with pytest.raises(BadInputError, match="prune.ratio 0.05 removes no block of 32 of the student's 256 MLP channels"):
        kept_width(m, "ratio", 0.05)
    with pytest.raises(BadInputError, match="task causal-lm takes prune.ratio, target_macs or target_params"):
        kept_width(m, "target_speedup", 2.0)


def test_activation_keeps_the_busiest_channels_and_channels_that_never_fire_go_without_a_trace():
    m = llama(intermediate=64)
    silent = list(range(0, 64, 2))  # half the channels: a zero gate row makes SiLU(0) * up = 0 on every token
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.gate_proj.weight[silent] = 0.0
    ids = blocks()
    before = m(input_ids=ids).logits
    live = list(range(1, 64, 2))
    rows = [layer.mlp.up_proj.weight[live].clone() for layer in m.model.layers]
    info = narrow_mlps(m, 32, "activation", ids, batch_size=2)
    assert m.config.intermediate_size == 32
    for layer, up in zip(m.model.layers, rows, strict=True):
        assert (layer.mlp.gate_proj.out_features, layer.mlp.down_proj.in_features) == (32, 32)
        assert layer.mlp.intermediate_size == 32
        assert torch.equal(layer.mlp.up_proj.weight, up)  # exactly the live channels, in order
    assert info["activation_kept"] == [1.0, 1.0]
    torch.testing.assert_close(m(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_weight_magnitude_keeps_the_largest_channels():
    m = llama(intermediate=64)
    with torch.no_grad():
        for layer in m.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[:32] *= 0.01  # the first half small in every coupled weight
            layer.mlp.down_proj.weight[:, :32] *= 0.01
    big = [layer.mlp.gate_proj.weight[32:].clone() for layer in m.model.layers]
    narrow_mlps(m, 32, "l2", blocks(), batch_size=2)
    for layer, kept in zip(m.model.layers, big, strict=True):
        assert torch.equal(layer.mlp.gate_proj.weight, kept)


def test_a_stored_pruned_state_loads_into_a_model_of_its_width():
    m = llama(intermediate=64)
    narrow_mlps(m, 32, "random", blocks(), batch_size=2)
    fresh = narrowed(llama(intermediate=64), 32)
    fresh.load_state_dict(m.state_dict())
    ids = blocks(1)
    torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, m(input_ids=ids).logits)
    assert count_lm_params(fresh) == count_lm_params(m) < count_lm_params(llama(intermediate=64))
