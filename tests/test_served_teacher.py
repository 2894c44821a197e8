"""The trainer's served-teacher client against tiny misbehaving HTTP handlers (no model behind them):
answers that do not match the request are refused after the retries, 4xx is not retried, 5xx is, and
requests in flight stay within max_concurrency. Plus the config rules for served teachers."""

import json
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import need  # noqa: E402

need("transformers")
need("yaml")

from gopd import config as config_mod  # noqa: E402
from gopd import trainer as trainer_mod  # noqa: E402
from gopd.serving.served_teacher import ServedTeacher, ServedTeacherError  # noqa: E402

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml")
VOCAB = 81


def good_answer(seq, k):
    """A well-formed answer: uniform log-probs, ids 2.. as the top-k."""
    lp = -math.log(VOCAB)
    entries = [None]
    for tok in seq[1:]:
        e = {str(2 + r): dict(logprob=lp, rank=r + 1, decoded_token="x") for r in range(k)}
        e.setdefault(str(tok), dict(logprob=lp, rank=k + 1, decoded_token="x"))
        entries.append(e)
    return dict(object="text_completion", choices=[dict(index=0, text="", prompt_logprobs=entries)])


class Fake:
    """A threaded HTTP server on loopback whose /v1/completions answer is `answer(body, n)` (n: request
    number) returning (status, JSON object)."""

    def __init__(self, answer, delay=0.0):
        self.answer, self.delay, self.requests, self.inflight, self.max_inflight = answer, delay, 0, 0, 0
        lock, fake = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, obj):
                raw = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._send(200, dict(object="list", data=[dict(id="fake", object="model")]))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    fake.requests += 1
                    n = fake.requests
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                time.sleep(fake.delay)
                with lock:
                    fake.inflight -= 1
                self._send(*fake.answer(body, n))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def client(url, **kw):
    kw = dict(dict(vocab=VOCAB, top_k=2, retries=2, backoff=0.01, timeout=5), **kw)
    return ServedTeacher(url, **kw)


PROMPTS, RESPONSES = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]


def test_good_answer_parsed():
    with Fake(lambda body, n: (200, good_answer(body["prompt"], body["prompt_logprobs"]))) as fake:
        scores = client(fake.url).score(PROMPTS, RESPONSES)
    assert [s.actual.numel() for s in scores] == [2, 3]
    assert all(abs(float(x) + math.log(VOCAB)) < 1e-6 for s in scores for x in s.actual)
    assert scores[0].topk_ids.tolist() == [[2, 3], [2, 3]]


def truncated(body, n):
    a = good_answer(body["prompt"], 2)
    a["choices"][0]["prompt_logprobs"].pop()
    return 200, a


def out_of_range(body, n):
    a = good_answer(body["prompt"], 2)
    a["choices"][0]["prompt_logprobs"][-1]["500"] = dict(logprob=-9.0, rank=90)
    return 200, a


def missing_actual(body, n):
    a = good_answer(body["prompt"], 2)
    a["choices"][0]["prompt_logprobs"][-1].pop(str(body["prompt"][-1]))
    return 200, a


def positive(body, n):
    a = good_answer(body["prompt"], 2)
    a["choices"][0]["prompt_logprobs"][-1][str(body["prompt"][-1])]["logprob"] = 0.5
    return 200, a


def too_few(body, n):
    return 200, good_answer(body["prompt"], 0)   # only the actual token


@pytest.mark.parametrize("answer,message", [
    (truncated, "prompt_logprobs has 4 entries for a prompt of 5 tokens"),
    (out_of_range, "names token id 500, outside the vocabulary"),
    (missing_actual, "lacks the actual token"),
    (positive, "= 0.5 is not a log-probability"),
    (too_few, "fewer than top_k 2"),
    (lambda body, n: (500, dict(message="boom")), "HTTP 500"),
    (lambda body, n: (200, dict(choices=[])), "no choices"),
])
def test_mismatched_answer_refused_after_retries(answer, message):
    with Fake(answer) as fake:
        with pytest.raises(ServedTeacherError, match=f"failed after 3 attempts; last problem: .*{message}"):
            client(fake.url).score(PROMPTS[:1], RESPONSES[:1])
    assert fake.requests == 3


def test_4xx_not_retried_and_flaky_server_recovers():
    with Fake(lambda body, n: (400, dict(object="error", message="prompt_logprobs: too large"))) as fake:
        with pytest.raises(ServedTeacherError, match=r"refused the request \(HTTP 400\).*too large"):
            client(fake.url).score(PROMPTS[:1], RESPONSES[:1])
    assert fake.requests == 1

    def flaky(body, n):
        return (503, {}) if n == 1 else (200, good_answer(body["prompt"], 2))

    with Fake(flaky) as fake:
        (s,) = client(fake.url).score(PROMPTS[:1], RESPONSES[:1])
    assert s.actual.numel() == 2 and fake.requests == 2


def test_concurrency_is_bounded():
    with Fake(lambda body, n: (200, good_answer(body["prompt"], 2)), delay=0.1) as fake:
        client(fake.url, max_concurrency=2).score(PROMPTS * 4, RESPONSES * 4)
    assert fake.max_inflight == 2 and fake.requests == 8


def smoke_cfg(tmp_path, *overrides):
    return config_mod.load(SMOKE, (f"out_dir={tmp_path}", "eval_teachers=false", "n_eval=2",
                                   "eval_max_new_tokens=4", "eval_at_start=false") + overrides)


def test_trainer_refuses_misbehaving_server(tmp_path):
    """A server answering one entry short is refused by the trainer: no step is taken."""
    with Fake(truncated) as fake:
        trainer = trainer_mod.Trainer(smoke_cfg(tmp_path, "steps=1", f"teacher={{url: {fake.url}, top_k: 2, "
                                                                     "retries: 1, backoff: 0.01}"))
        before = trainer.student.get_output_embeddings().weight.detach().clone()
        with pytest.raises(ServedTeacherError, match="entries for a prompt of"):
            trainer.train_step()
    assert trainer.step == 0 and bool((trainer.student.get_output_embeddings().weight == before).all())


@pytest.mark.parametrize("overrides,message", [
    (("teacher={url: 'http://127.0.0.1:1', top_k: 2}", "mode=full"), "use mode: topk"),
    (("teacher={url: 'http://127.0.0.1:1', top_k: 0}", "mode=topk"), "mode topk needs the served teacher's top_k"),
    (("teacher={url: 'http://127.0.0.1:1', top_k: 2}", "temperature=0.7"), "temperature must be 1.0"),
    (("teacher={url: 'ftp://x', top_k: 2}",), r"teacher.url: expected http://host:port"),
    (("teachers={add: {url: 'http://127.0.0.1:1', topk: 2}}",), r"teachers.add: unknown served-teacher key"),
    (("teacher={url: 'http://127.0.0.1:1', top_k: -1}",), r"teacher.top_k: expected an int >= 0"),
    (("reference={url: 'http://127.0.0.1:1'}",), "only teachers can be served"),
])
def test_served_config_errors(tmp_path, overrides, message):
    with pytest.raises(config_mod.ConfigError, match=message):
        smoke_cfg(tmp_path, *overrides)


def test_serve_cli_reports_bad_model_spec(capsys):
    from gopd.cli import main
    assert main(["serve", "--model", "{foo: 1}", "--port", "0"]) == 2
    assert "a model spec mapping needs a 'tiny' config" in capsys.readouterr().err
