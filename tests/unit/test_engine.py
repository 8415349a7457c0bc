"""The video data engine's parts: caption scores and attribute recall, the summarizer
backends (rules; llm through a tiny local chat model), the caption checks of
validate-captions, and the video zero-shot grouping."""

from __future__ import annotations

import pytest
import torch

from peflow.data.synth import vocab
from peflow.engine.metrics import ACTION_CUES, attribute_recall, caption_scores, names_attribute
from peflow.engine.summarize import EngineInput, LLMSummarizer, RulesSummarizer, clean_metadata, get_summarizer
from peflow.validation.features import PROMPT_ECHOES, max_ngram_repeat

HUMAN = ("A medium-sized red circle slides steadily from the left side of the frame to the right side, "
         "on a plain background. The clip lasts 16 frames.")
META = {"category": "move right", "human_caption": HUMAN,
        "objects": [{"category": "circle", "colour": "red"}], "title": "AMAZING red circl moving #fyp"}


def test_scores_rank_a_faithful_caption_above_a_wrong_one():
    other = "A small blue star shrinks in the center, on a grid background. The clip lasts 16 frames."
    close = "a red circle slides steadily from the left side of the frame to the right side on a plain background"
    wrong = "a blue star shrinks in the center of a grid"
    good = caption_scores([HUMAN, other], [HUMAN, other])
    assert good["bleu4"] > 0.99 and good["cider"] > 5  # CIDEr's idf needs more than one reference set
    near, far = caption_scores([close, other], [HUMAN, other]), caption_scores([wrong, other], [HUMAN, other])
    assert near["bleu4"] > far["bleu4"] and near["cider"] > far["cider"]
    with pytest.raises(ValueError):
        caption_scores([], [])


def test_attribute_recall_reads_the_ground_truth():
    assert names_attribute(HUMAN, META, "action") and names_attribute(HUMAN, META, "shape")
    assert not names_attribute("a red circle moves to the left", META, "action")
    assert attribute_recall(["a red ring bounces", HUMAN], [META, META]) == {"shape": 0.5, "colour": 1.0,
                                                                             "action": 0.5}
    # every action's human caption names it, and no other action's cue fires on it wrongly for moves
    for action in vocab.ACTIONS:
        assert ACTION_CUES[action], action


def test_rules_summarizer_keeps_the_story_and_confirmed_metadata_only():
    x = EngineInput(clip_caption="A circle slides to the right.",
                    frame_captions=("a small red circle on the left", "a small red circle on the right"),
                    title="AMAZING red circle!!! #fyp #shapes", description="Don't forget to like and subscribe!")
    out = RulesSummarizer().summarize([x])[0]
    assert out.startswith("A circle slides to the right") and "red" in out
    assert "#" not in out and "subscribe" not in out and "AMAZING" not in out
    assert RulesSummarizer().summarize([x]) == [out]  # deterministic
    empty = EngineInput(clip_caption="", frame_captions=("",), title="red circle moving", description="")
    assert RulesSummarizer().summarize([empty])[0] == "red circle moving"  # nothing seen: the metadata
    assert RulesSummarizer(max_words=3).summarize([x])[0] == "A circle slides"
    assert clean_metadata("Check the link in my bio! A red star spins. #red") == "A red star spins."


def test_llm_summarizer_prompts_a_local_chat_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from peflow.models.lm import train_tokenizer

    tok = train_tokenizer(["Create a concise caption of a video", HUMAN, "red circle moving"] * 4, 300)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    s = get_summarizer("llm", model=str(tmp_path / "lm"))
    assert isinstance(s, LLMSummarizer)
    x = EngineInput(clip_caption="A circle slides.", frame_captions=("a red circle",), title="red circle",
                    description="")
    prompt = s.prompt(x)
    assert "Create a concise caption" in prompt and "Video caption: A circle slides." in prompt
    outs = LLMSummarizer(str(tmp_path / "lm"), max_new_tokens=5, batch_size=2).summarize([x, x, x])
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs) and outs[0] == outs[2]
    no_template = tmp_path / "plain"
    tok.chat_template = None
    tok.save_pretrained(no_template)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(no_template)
    with pytest.raises(ValueError, match="chat template"):
        get_summarizer("llm", model=str(no_template))
    with pytest.raises(ValueError, match="summarizer_model"):
        get_summarizer("llm")


def test_caption_checks_find_loops_and_prompt_echoes():
    assert max_ngram_repeat(HUMAN) == 1
    assert max_ngram_repeat("the red circle the red circle the red circle the red circle") == 4
    assert max_ngram_repeat("very very big") == 1 and max_ngram_repeat("go go go go now") == 4
    assert any(e in "Title: x. Video caption: y".casefold() for e in PROMPT_ECHOES)


def test_video_zeroshot_merges_reversed_pairs_into_motion_types():
    from peflow.evaluate.video import INDISTINGUISHABLE, MOTION_TYPES, VideoFeatures, video_zeroshot

    assert sum(len(m) for m in MOTION_TYPES.values()) == len(vocab.ACTIONS) == 10 and len(MOTION_TYPES) == 7
    classifier = torch.eye(10)
    # every clip looks like "move left": right for move-left clips, wrong (but right motion type) for move-right
    labels = torch.tensor([vocab.ACTIONS.index("move left"), vocab.ACTIONS.index("move right")] * 5)
    feats = VideoFeatures(emb=classifier[[0] * 10], labels=labels, captions=[None] * 10, keys=[str(i) for i in range(10)])
    m, matrix = video_zeroshot(feats, classifier)
    assert m["zeroshot/top1"] == 0.5 and m["zeroshot_motion/top1"] == 1.0
    assert m["zeroshot_pair/move_left__move_right"] == 0.5
    assert int(matrix.sum()) == 10 and int(matrix[1, 0]) == 5
    assert ("move left", "move right") in INDISTINGUISHABLE
