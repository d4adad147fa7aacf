"""Remote rewards: a real reward server on 127.0.0.1 (aiohttp, in a thread of this process or ``rlr
serve-reward`` in a subprocess) and ``RemoteReward`` talking to it, under real training where it matters.

What docs/remote_rewards.md promises, each shown here: rewards equal the in-process reward's exactly (images
and videos, any batch split); a server that does not answer in time, is down or fails is retried with
backoff and then named in a ``RewardServerError``; a refused request fails at once; malformed answers become
NaN rewards with a warning, and training skips and counts that update; RLR scores the last step of the
remote (non-differentiable) reward by a likelihood ratio; and a server killed in the middle of ``rlr fit``
stops the run with status 1 and the URL, leaves its checkpoint intact, and the run resumes from it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import requests
import torch
import yaml
from aiohttp import web
from lightning.pytorch.loggers import CSVLogger

from rlr_lightning.cli import main
from rlr_lightning.data import PromptDataModule
from rlr_lightning.estimators import RLR
from rlr_lightning.module import RLRModule
from rlr_lightning.rewards import (
    PerFrameReward,
    QuantizedBrightness,
    RemoteReward,
    RewardRequestError,
    RewardServerError,
    TargetColor,
)
from rlr_lightning.rewards.protocol import INFO_PATH, SCORE_PATH, decode_request, encode_request
from rlr_lightning.rewards.server import BackgroundServer, make_app, serve
from tests.rewards.remote_helpers import FailingReward, RecordingReward, SlowReward
from tests.test_module import make_trainer

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red fox", "a blue car", "a green hill", "a white cat", "a black dog"]
#: Retries fast enough for tests.
FAST = dict(max_retries=2, backoff_s=0.02, timeout_s=10.0)


def served(reward) -> BackgroundServer:
    return BackgroundServer(make_app(reward, device="cpu"))


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def garbage_app(answers: list[str]) -> tuple[web.Application, list[str]]:
    """A server that describes itself as an image reward server (``/info``) but answers ``/score`` requests
    with ``answers`` in turn (the last one repeats): ``ok`` (rewards 0, 1, ...), ``not-json``, ``short`` (one
    reward too few), ``nan`` (a NaN in Python's JSON dialect), ``strings`` or ``400``. Also returns
    the list of answers given so far."""
    given: list[str] = []

    async def info(request: web.Request) -> web.Response:
        return web.json_response(
            {"reward": "Garbage", "video": False, "differentiable": False, "protocol": 1}
        )

    async def score(request: web.Request) -> web.Response:
        _, prompts = decode_request(await request.read(), video=False)
        n = len(prompts)
        kind = answers[min(len(given), len(answers) - 1)]
        given.append(kind)
        if kind == "ok":
            return web.json_response({"rewards": [float(i) for i in range(n)]})
        if kind == "not-json":
            return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if kind == "short":
            return web.json_response({"rewards": [1.0] * (n - 1)})
        if kind == "nan":
            return web.Response(
                text='{"rewards": [NaN' + ", 1.0" * (n - 1) + "]}", content_type="application/json"
            )
        if kind == "strings":
            return web.json_response({"rewards": ["high"] * n})
        if kind == "400":
            return web.json_response({"error": "images must be 512 x 512 pixels"}, status=400)
        raise AssertionError(f"unknown answer {kind!r}")

    app = web.Application()
    app.router.add_get(INFO_PATH, info)
    app.router.add_post(SCORE_PATH, score)
    return app, given


def images(batch: int = 5, size: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_round_trip_equals_the_in_process_reward_and_splits_large_batches(dtype):
    served_reward = RecordingReward()
    batch = images(dtype=dtype)
    with served(served_reward) as server:
        remote = RemoteReward(server.url, batch_size=2, **FAST)
        rewards = remote(batch, PROMPTS)
    assert rewards.dtype == torch.float32 and rewards.shape == (5,)
    assert torch.equal(rewards, TargetColor()(batch, PROMPTS))  # bit for bit: no quantisation on the way
    # Five images in requests of at most two, each with its own prompts, in order.
    assert served_reward.calls == [PROMPTS[:2], PROMPTS[2:4], PROMPTS[4:]]
    assert remote.server_info == {
        "reward": "RecordingReward",
        "video": False,
        "differentiable": True,
        "protocol": 1,
    }


def test_video_round_trip_equals_the_in_process_reward_and_the_kind_is_checked():
    videos = torch.rand(3, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with served(PerFrameReward(TargetColor())) as server:
        rewards = RemoteReward(server.url, video=True, batch_size=2, **FAST)(videos, PROMPTS[:3])
        assert torch.equal(rewards, PerFrameReward(TargetColor())(videos, PROMPTS[:3]))
        with pytest.raises(
            RewardRequestError, match=r"serves PerFrameReward, which scores videos.*video=true"
        ):
            RemoteReward(server.url, **FAST)(images(3), PROMPTS[:3])


def test_the_server_refuses_malformed_requests_with_400_and_a_message():
    with served(PerFrameReward(TargetColor())) as server:
        url = server.url + SCORE_PATH
        answer = requests.post(url, data=b"not a safetensors file", timeout=10)
        assert answer.status_code == 400 and "not a safetensors file" in answer.json()["error"]
        answer = requests.post(url, data=encode_request(images(2), PROMPTS[:2]), timeout=10)
        assert answer.status_code == 400
        assert (
            answer.json()["error"]
            == "the served reward takes videos of shape (B, F, 3, H, W), got (2, 3, 8, 8)"
        )
        with pytest.raises(ValueError, match="2 images but 3 prompts"):
            encode_request(images(2), PROMPTS[:3])


def test_a_request_over_the_servers_limit_is_refused_with_what_to_change():
    with BackgroundServer(make_app(TargetColor(), max_request_mb=0.01)) as server:  # 10 KiB: under 4 images
        remote = RemoteReward(server.url, **FAST)
        with pytest.raises(
            RewardRequestError, match=r"HTTP 413\): Maximum request body size .* send fewer images"
        ):
            remote(images(4, size=16), PROMPTS[:4])
        remote.batch_size = 2
        assert torch.equal(
            remote(images(4, size=16), PROMPTS[:4]), TargetColor()(images(4, size=16), PROMPTS[:4])
        )


# --- a server that does not answer, is down or fails ---------------------------------------------------------


def test_a_timeout_is_retried_then_raises_naming_the_url(caplog):
    with served(SlowReward(seconds=0.4)) as server:
        remote = RemoteReward(server.url, timeout_s=0.1, max_retries=1, backoff_s=0.01)
        with caplog.at_level(logging.WARNING, logger="rlr_lightning"):
            with pytest.raises(RewardServerError) as failed:
                remote(images(2), PROMPTS[:2])
    message = str(failed.value)
    assert f"the reward server {server.url}{SCORE_PATH} failed 2 tries" in message
    assert "no answer within timeout_s=0.1 s" in message and "--ckpt_path" in message
    assert f"Reward server {server.url}{SCORE_PATH}: try 1 of 2 failed (no answer within" in caplog.text


def test_a_dead_server_is_retried_with_exponential_backoff_then_raises_naming_the_url(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    waits: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr("rlr_lightning.rewards.remote.time.sleep", lambda s: (waits.append(s), real_sleep(s)))
    remote = RemoteReward(url, max_retries=3, backoff_s=0.01)
    with pytest.raises(RewardServerError) as failed:
        remote(images(2), PROMPTS[:2])
    assert waits == [0.01, 0.02, 0.04]
    # A ConnectionError: rlr fit prints it as a one-line error (exit status 1), not a traceback.
    assert isinstance(failed.value, ConnectionError)
    message = str(failed.value)
    assert f"the reward server {url}{INFO_PATH} failed 4 tries" in message
    assert "Connection refused" in message and "rlr serve-reward" in message and "--ckpt_path" in message


def test_a_reward_that_raises_on_the_server_is_retried_then_reported_with_its_message():
    with served(FailingReward()) as server:
        with pytest.raises(
            RewardServerError,
            match=r"failed 3 tries \(last cause: HTTP 500: FailingReward raised "
            r"RuntimeError: the reward model is broken\)",
        ):
            RemoteReward(server.url, **FAST)(images(2), PROMPTS[:2])


def test_a_refused_request_fails_at_once_with_the_servers_message():
    app, given = garbage_app(["400"])
    with BackgroundServer(app) as server:
        with pytest.raises(RewardRequestError, match=r"refused the request \(HTTP 400\): images must be 512"):
            RemoteReward(server.url, **FAST)(images(2), PROMPTS[:2])
    assert given == ["400"]  # not tried again


def test_a_server_that_is_not_a_reward_server_is_named():
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get(INFO_PATH, hello)
    with BackgroundServer(app) as server:
        with pytest.raises(
            RewardRequestError, match=rf"{server.url}/info answered 'hello', not a reward server"
        ):
            RemoteReward(server.url, **FAST)(images(2), PROMPTS[:2])


@pytest.mark.parametrize(
    "answer, problem",
    [
        ("not-json", "not JSON: '<html><body>502 Bad Gateway"),
        ("short", "1 rewards for 2 images"),
        ("nan", "1 of 2 rewards are not finite numbers (e.g. 'nan')"),
        ("strings", "2 of 2 rewards are not finite numbers (e.g. \"'high'\")"),
    ],
)
def test_a_malformed_answer_gives_nan_rewards_and_a_warning(answer, problem, caplog):
    app, _ = garbage_app([answer])
    with BackgroundServer(app) as server, caplog.at_level(logging.WARNING, logger="rlr_lightning"):
        rewards = RemoteReward(server.url, **FAST)(images(2), PROMPTS[:2])
    expected = [float("nan"), 1.0] if answer == "nan" else [float("nan")] * 2
    torch.testing.assert_close(rewards, torch.tensor(expected), equal_nan=True)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith(f"Reward server {server.url} gave a malformed answer ({problem}")
    assert "in training the update is skipped" in warning.getMessage()


# --- under training ------------------------------------------------------------------------------------------


def make_module(tiny_pipeline_dir, reward, **kwargs) -> RLRModule:
    return RLRModule(
        pretrained_model_name_or_path=str(tiny_pipeline_dir),
        num_steps=4,
        eta=1.0,
        estimator=RLR(h=1),
        reward=reward,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        **kwargs,
    )


def test_a_malformed_answer_during_training_skips_that_update_and_logs_it(
    tiny_pipeline_dir, tmp_path, caplog
):
    app, given = garbage_app(["ok", "not-json", "ok"])
    with BackgroundServer(app) as server, caplog.at_level(logging.WARNING, logger="rlr_lightning"):
        module = make_module(tiny_pipeline_dir, RemoteReward(server.url, **FAST))
        trainer = make_trainer(
            tmp_path,
            max_steps=2,
            max_epochs=1,
            limit_train_batches=3,
            log_every_n_steps=1,
            logger=CSVLogger(tmp_path, name="run"),
        )
        trainer.fit(module, datamodule=PromptDataModule(prompt_set="animals", batch_size=2))
    assert given == ["ok", "not-json", "ok"]
    assert trainer.global_step == 2 and module.skips.total == 1
    rows = [
        r for r in csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")) if r["train/reward"]
    ]
    assert [float(r["train/skipped_updates"]) for r in rows] == [0, 1, 1]
    assert f"Reward server {server.url} gave a malformed answer (not JSON" in caplog.text
    assert "Skipping update at step 1: non-finite reward (2 of 2)" in caplog.text


def test_rlr_scores_the_last_step_by_likelihood_ratio_and_trains_as_with_the_in_process_reward(
    tiny_pipeline_dir, tmp_path
):
    def one_step(reward) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The LoRA weights before and after one update toward ``reward``, from the same start."""
        module = make_module(tiny_pipeline_dir, reward)
        assert module.estimator.fo_by_likelihood_ratio and not module.estimator.requires_reward_grad
        L.seed_everything(0)  # the LoRA's initial weights
        module.configure_model()
        before = {k: v.detach().clone() for k, v in module.backbone.lora_parameters().items()}
        make_trainer(tmp_path, 1).fit(module, datamodule=PromptDataModule(prompt_set="animals", batch_size=4))
        return before, {k: v.detach().clone() for k, v in module.backbone.lora_parameters().items()}

    with served(QuantizedBrightness(levels=1000)) as server:
        initial, remote = one_step(RemoteReward(server.url, **FAST))
    _, local = one_step(QuantizedBrightness(levels=1000))
    assert any(not torch.equal(remote[k], initial[k]) for k in remote)  # the update moved the LoRA weights
    for name, value in remote.items():
        assert torch.equal(value, local[name]), name  # exactly as the in-process reward trains


# --- rlr serve-reward ----------------------------------------------------------------------------------------


def test_serve_reward_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "serve-reward",
                "--reward",
                "rlr_lightning.rewards.TargetColor",
                "--reward.init_args.colour",
                "[1,0,0]",
            ]
        )
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "rlr serve-reward: error: --reward.init_args.colour: rlr_lightning.rewards.TargetColor "
        "has no option 'colour' (did you mean color?)"
    )
    with served(TargetColor()) as busy, pytest.raises(SystemExit) as exited:
        main(["serve-reward", "--reward", "rlr_lightning.rewards.TargetColor", "--port", str(busy.port)])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert f"rlr serve-reward: error: cannot listen on 127.0.0.1:{busy.port}" in err
    assert "choose another --port (0 picks a free one)" in err


def test_serve_logs_its_url_answers_and_stops_cleanly_on_sigterm(caplog):
    problems: list[str] = []

    def check_then_stop() -> None:
        try:
            deadline = time.monotonic() + 30
            while (match := re.search(r"on (http://127\.0\.0\.1:\d+): train with", caplog.text)) is None:
                assert time.monotonic() < deadline, "the server never said where it serves"
                time.sleep(0.01)
            url = match.group(1)
            assert f"--model.reward.init_args.url {url}; Ctrl+C stops" in caplog.text
            info = requests.get(url + INFO_PATH, timeout=10).json()
            assert info == {"reward": "TargetColor", "video": False, "differentiable": True, "protocol": 1}
        except Exception as err:  # reported by the test, on its own thread
            problems.append(repr(err))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    def not_handled(signum, frame):
        raise AssertionError("serve did not handle SIGTERM")

    previous = signal.signal(signal.SIGTERM, not_handled)
    checker = threading.Thread(target=check_then_stop, daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="rlr_lightning"):
            checker.start()
            serve(TargetColor(), host="127.0.0.1", port=0, device="cpu")  # returns on SIGTERM
    finally:
        checker.join()
        signal.signal(signal.SIGTERM, previous)
    assert problems == []
    assert "Stopping the reward server at http://127.0.0.1:" in caplog.text


def rlr_env() -> dict[str, str]:
    """The environment of the ``rlr`` subprocesses: the test's reward classes import as ``tests.rewards...``."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def rlr_process(args: list[str], cwd: Path, console: Path) -> subprocess.Popen:
    with open(console, "w") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "rlr_lightning", *args],
            cwd=cwd,
            env=rlr_env(),
            stdout=stream,
            stderr=subprocess.STDOUT,
        )


def wait_for(condition, proc: subprocess.Popen, console: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, console.read_text()[-3000:]
        time.sleep(0.05)


def served_url(console: Path) -> str | None:
    match = re.search(r"Serving \w+ \(images\) on (http://127\.0\.0\.1:\d+)", console.read_text())
    return match.group(1) if match else None


@pytest.mark.slow
def test_a_server_killed_mid_run_stops_it_with_the_url_and_the_run_resumes_from_its_checkpoint(
    tiny_pipeline_dir, tmp_path
):
    checkpoints, marker = tmp_path / "checkpoints", tmp_path / "stalled"
    last = checkpoints / "last.ckpt"
    # The server: a user's reward class, from a config file, on a free port; it stalls once a checkpoint exists.
    config = tmp_path / "server.yaml"
    reward = {"checkpoint": str(last), "marker": str(marker)}
    config.write_text(
        yaml.safe_dump(
            {
                "reward": {
                    "class_path": "tests.rewards.remote_helpers.StallAfterCheckpoint",
                    "init_args": reward,
                },
                "host": "127.0.0.1",
                "device": "cpu",
            }
        )
    )
    server_console = tmp_path / "server.txt"
    server = rlr_process(["serve-reward", "--config", str(config), "--port", "0"], tmp_path, server_console)
    try:
        wait_for(lambda: served_url(server_console) is not None, server, server_console)
        url = served_url(server_console)
        assert url is not None
        fit_args = [
            "fit",
            "--seed_everything=0",
            f"--model.pretrained_model_name_or_path={tiny_pipeline_dir}",
            "--model.num_steps=3",
            "--model.estimator=RLR",
            "--model.estimator.h=1",
            "--model.reward=rlr_lightning.rewards.RemoteReward",
            f"--model.reward.init_args.url={url}",
            "--model.reward.init_args.max_retries=2",
            "--model.reward.init_args.backoff_s=0.05",
            "--data.batch_size=2",
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=3",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.callbacks+=ModelCheckpoint",
            f"--trainer.callbacks.dirpath={checkpoints}",
            "--trainer.callbacks.every_n_train_steps=1",
            "--trainer.callbacks.save_last=true",
        ]
        fit_console = tmp_path / "fit.txt"
        fit = rlr_process(fit_args, tmp_path, fit_console)
        try:
            wait_for(marker.exists, fit, fit_console)  # step 1 checkpointed, step 2 waits for its rewards
            saved = hashlib.sha256(last.read_bytes()).hexdigest()
            server.kill()  # no goodbye: the connection drops, then nothing listens
            assert fit.wait(timeout=60) == 1, fit_console.read_text()[-3000:]
        finally:
            fit.kill()
    finally:
        server.kill()
        server.wait()
    output = fit_console.read_text()
    assert f"rlr fit: error: the reward server {url}{SCORE_PATH} failed 3 tries" in output, output[-3000:]
    assert "Traceback" not in output
    # The checkpoint written before the server died is untouched and loads; the run resumes from it.
    assert hashlib.sha256(last.read_bytes()).hexdigest() == saved
    assert torch.load(last, weights_only=False)["global_step"] == 1
    port = int(url.rsplit(":", 1)[1])
    with BackgroundServer(make_app(TargetColor()), port=port):  # the server is back, at the same address
        main([*fit_args, f"--ckpt_path={last}"])  # the same command, in this process (no second start-up)
    assert torch.load(last, weights_only=False)["global_step"] == 3
