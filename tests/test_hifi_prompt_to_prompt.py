"""Cross-attention reuse for subject replacement (HiFi Tuner alg. 3, prompt-to-prompt): the new caption's attention
is the source's for every token except the new subject's, whose columns keep the new process's weights."""

import pytest
import torch

from subjectops.inference.prompt_to_prompt import AttentionReuse, source_index, word_span


class CrossAttention(torch.nn.Module):
    def get_attention_scores(self, query, key, attention_mask=None):
        return (query @ key.transpose(-1, -2)).softmax(-1)


class UNet(torch.nn.Module):
    """What AttentionReuse touches of a UNet: its attention processors and the cross-attention (attn2) layers."""

    def __init__(self):
        super().__init__()
        self.attn1, self.attn2 = CrossAttention(), CrossAttention()

    def set_attn_processor(self, processor):
        self.processor = processor


def test_word_span_finds_the_first_occurrence_and_names_a_missing_word():
    assert word_span([0, 5, 6, 7, 5, 6], [5, 6]) == (1, 3)
    with pytest.raises(ValueError):
        word_span([0, 5, 7], [5, 6])


def test_source_index_shifts_the_tokens_after_a_word_of_another_length():
    # source: [s, a, CAN, x, y, pad]; new: [s, a, BACK, PACK, x, y] -> x, y read the source's 3, 4
    index = source_index(6, span_g=(2, 4), span_r=(2, 3))
    assert index.tolist() == [0, 1, 2, 2, 3, 4]


def test_reuse_keeps_the_source_maps_except_for_the_fresh_columns():
    unet = UNet()
    fresh = torch.tensor([False, False, True, False])  # the new subject word's column
    reuse = AttentionReuse(unet, fresh, torch.arange(4))
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 8, generator=g)  # 2 heads, 3 latent cells, 4 text tokens
    key_r, key_g = (torch.randn(2, 4, 8, generator=g) for _ in range(2))
    with reuse.recording(0)():
        source = unet.attn2.get_attention_scores(query, key_r)
    with reuse.reusing(0)():
        new = unet.attn2.get_attention_scores(query, key_g)
    own = CrossAttention().get_attention_scores(query, key_g)
    assert torch.equal(new[..., ~fresh], source[..., ~fresh])  # every other token: the stored a_t^{r*}
    assert torch.equal(new[..., fresh], own[..., fresh])  # the new subject: its own weights
    assert not torch.equal(new, source) and not torch.equal(new, own)
    # self-attention (attn1) and calls outside a mode are left alone
    assert torch.equal(unet.attn1.get_attention_scores(query, key_g), own)
    assert torch.equal(unet.attn2.get_attention_scores(query, key_g), own)
