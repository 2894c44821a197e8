"""`gopd serve` as a real process on loopback, and the trainer scoring against it.

One server process (the smoke config's teacher) is shared by the module; the last test kills it mid-run.
"""

import json
import math
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import LossRecorder, need  # noqa: E402

need("transformers")
need("yaml")
need("aiohttp")

from gopd import config as config_mod  # noqa: E402
from gopd import trainer as trainer_mod  # noqa: E402
from gopd.models import load_model  # noqa: E402
from gopd.serving import process as serve_process  # noqa: E402
from gopd.serving.served_teacher import ServedTeacherError  # noqa: E402

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml")
TEACHER = "{tiny: {hidden_size: 48, num_hidden_layers: 1}, seed: 1}"   # the smoke config's teacher
START_TIMEOUT = 120


def start_server(*extra):
    """Starts `gopd serve` on a free loopback port; returns (process, url)."""
    return serve_process.launch(["--model", TEACHER, *extra], START_TIMEOUT)


stop = serve_process.stop


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--max-logprobs", "8", "--batch-wait-ms", "200")
    yield proc, url
    stop(proc)


@pytest.fixture(scope="module")
def teacher_model():
    model, tok = load_model({"tiny": {"hidden_size": 48, "num_hidden_layers": 1}, "seed": 1})
    return model.eval(), tok


def post(url, body, raw=None):
    """(status, decoded JSON answer)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return resp.status, resp.read()


def forward_passes(url):
    text = get(url, "/metrics")[1].decode()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("gopd_forward_passes_total")))


def expected_logprobs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return logits.log_softmax(-1)


def test_prompt_logprobs_in_vllm_format(server, teacher_model):
    _, url = server
    model, tok = teacher_model
    assert get(url, "/health")[0] == 200
    models = json.loads(get(url, "/v1/models")[1])
    assert models["object"] == "list" and models["data"][0]["id"] == "gopd-teacher"
    ids, k = [5, 17, 9, 30, 2, 44, 8], 4
    status, answer = post(url, dict(model="gopd-teacher", prompt=ids, max_tokens=1, echo=True, prompt_logprobs=k,
                                    temperature=0))
    assert status == 200, answer
    assert answer["object"] == "text_completion" and answer["usage"]["prompt_tokens"] == len(ids)
    (choice,) = answer["choices"]
    logp = expected_logprobs(model, ids)
    greedy = int(logp[-1].argmax())
    assert choice["text"] == tok.decode(ids) + tok.decode([greedy])   # echo + one greedy token
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        row = logp[j - 1]
        top = row.topk(k)
        want = {int(i): (float(v), r + 1) for r, (v, i) in enumerate(zip(top.values, top.indices))}
        actual = ids[j]
        want.setdefault(actual, (float(row[actual]), 1 + int((row > row[actual]).sum())))
        got = {int(key): (val["logprob"], val["rank"]) for key, val in entries[j].items()}
        assert set(got) == set(want), j
        for tid, (lp, rank) in want.items():
            assert abs(got[tid][0] - lp) < 1e-4 and got[tid][1] == rank, (j, tid)
            assert entries[j][str(tid)]["decoded_token"] == tok.decode([tid])
    # Greedy generation of several tokens, without prompt_logprobs (null then).
    seq = list(ids)
    for _ in range(3):
        nxt = int(expected_logprobs(model, seq)[-1].argmax())
        seq.append(nxt)
        if nxt == tok.eos_token_id:
            break
    status, answer = post(url, dict(prompt=ids, max_tokens=3, temperature=0))
    assert status == 200 and answer["choices"][0]["prompt_logprobs"] is None
    assert answer["choices"][0]["text"] == tok.decode(seq[len(ids):])
    assert answer["usage"]["completion_tokens"] == len(seq) - len(ids)


def test_concurrent_ragged_requests_share_a_batch_and_match_alone(server):
    """Concurrent prompts of different lengths are scored in one padded forward pass; each answer equals
    the answer to the same prompt sent alone."""
    _, url = server
    prompts = [list(range(3, 3 + 2 + 3 * i)) for i in range(6)]

    def ask(p):
        return post(url, dict(prompt=p, max_tokens=0, prompt_logprobs=3))[1]["choices"][0]["prompt_logprobs"]

    def same(a, b):
        assert len(a) == len(b) and a[0] is None and b[0] is None
        for ea, eb in zip(a[1:], b[1:]):
            assert ea.keys() == eb.keys()
            assert all(abs(ea[t]["logprob"] - eb[t]["logprob"]) < 1e-5 and ea[t]["rank"] == eb[t]["rank"]
                       for t in ea)

    alone = [ask(p) for p in prompts]
    before = forward_passes(url)
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert forward_passes(url) - before < len(prompts)   # some requests shared a forward pass
    for a, b in zip(alone, together):
        same(a, b)
    # A list of prompts in one request: one choice each, in order.
    status, answer = post(url, dict(prompt=prompts[:2], max_tokens=0, prompt_logprobs=3))
    assert status == 200 and [c["index"] for c in answer["choices"]] == [0, 1]
    same(answer["choices"][1]["prompt_logprobs"], alone[1])


@pytest.mark.parametrize("body,raw,message", [
    (dict(prompt=[5, 6, 500], prompt_logprobs=2), None, "token id 500 is outside the vocabulary"),
    (dict(prompt=[5, -1], prompt_logprobs=2), None, "token id -1 is outside"),
    (dict(prompt=[5, 6], prompt_logprobs=9), None, "prompt_logprobs: 9 is more than the server allows"),
    (dict(prompt=[5, 6], prompt_logprobs=-1), None, "prompt_logprobs: expected an int >= 0"),
    (None, b'{"prompt": [5, 6', "not valid JSON"),
    (dict(prompt="2+2="), None, "only token-id prompts"),
    (dict(prompt=[]), None, "non-empty list"),
    (dict(prompt=[5, 6], best_of=3), None, "unsupported field(s) ['best_of']"),
    (dict(prompt=[5, 6], model="other"), None, "serves 'gopd-teacher'"),
    (dict(prompt=[5, 6], max_tokens=10_000), None, "max_tokens"),
    ([1, 2], None, "JSON object"),
])
def test_bad_request_gets_4xx_and_server_keeps_serving(server, body, raw, message):
    _, url = server
    status, answer = post(url, body, raw=raw)
    assert status == 400 and answer["object"] == "error" and message in answer["message"], answer
    status, answer = post(url, dict(prompt=[5, 6, 7], max_tokens=0, prompt_logprobs=1))
    assert status == 200 and len(answer["choices"][0]["prompt_logprobs"]) == 3


def smoke_cfg(tmp_path, *overrides):
    return config_mod.load(SMOKE, (f"out_dir={tmp_path}", "eval_teachers=false", "n_eval=2",
                                   "eval_max_new_tokens=4", "eval_at_start=false") + overrides)


Recorder = LossRecorder


@pytest.mark.parametrize("mode", ["sampled", "topk"])
def test_served_loss_equals_colocated(server, tmp_path, monkeypatch, mode):
    """The same step (same seed: same rollouts) with the teacher co-located and served gives the same
    teacher log-probs (sampled) / the same top-k buckets (topk), loss and updated weights."""
    _, url = server
    rows, outs, weights = [], [], []
    rec = Recorder(monkeypatch)
    for name, teacher in (("local", None), ("served", f"teacher={{url: {url}, top_k: 4}}")):
        trainer = trainer_mod.Trainer(smoke_cfg(tmp_path / name, "steps=1", "lam=1.25", f"mode={mode}", "top_k=4",
                                                *([teacher] if teacher else [])))
        rec.outs = []
        rows.append(trainer.train_step())
        outs.append(rec.outs)
        weights.append(trainer.student.get_output_embeddings().weight.detach().clone())
    local, served = outs
    assert len(local) == len(served) == 2 and rows[0]["n_tokens"] == rows[1]["n_tokens"] > 0
    for a, b in zip(local, served):
        if mode == "sampled":
            torch.testing.assert_close(b.lp_t, a.lp_t, atol=2e-5, rtol=0)
        else:
            assert a.lp_t is None and b.lp_t is None
            torch.testing.assert_close(b.reward, a.reward, atol=2e-5, rtol=0)
        torch.testing.assert_close(b.loss, a.loss, atol=2e-5, rtol=0)
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 2e-5
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=0)


def test_killed_server_gives_clear_error_and_checkpoint_stays(server, tmp_path):
    """Runs last in this module: it kills the shared server after the first checkpoint."""
    proc, url = server
    cfg = smoke_cfg(tmp_path, "steps=3", "save_every=1", f"teacher={{url: {url}, top_k: 1, retries: 2, "
                                                           "backoff: 0.05, timeout: 5}")
    trainer = trainer_mod.Trainer(cfg)
    real_save = trainer.save

    def save_then_kill():
        real_save()
        stop(proc)

    trainer.save = save_then_kill
    t0 = time.monotonic()
    with pytest.raises(ServedTeacherError, match=r"served teacher http://127\.0\.0\.1:\d+: .*failed after 3 "
                                                  r"attempts; last problem: .*(Connection refused|URLError)"):
        trainer.train()
    assert time.monotonic() - t0 < 60
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert kept["step"] == 1
    fresh = trainer_mod.Trainer(smoke_cfg(tmp_path / "other", "steps=1"))
    fresh.student.load_state_dict(kept["model"])   # a complete, loadable checkpoint
    assert all(math.isfinite(float(v.float().sum())) for v in kept["model"].values())
