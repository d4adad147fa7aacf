"""A reward server: any reward model of this project (or a user's :class:`RewardModel`) served over HTTP.

Training then scores its samples with :class:`~rlr_lightning.rewards.remote.RemoteReward`, so that the reward
can live on another GPU or machine, or in another environment. The wire format is
:mod:`rlr_lightning.rewards.protocol`; the server is an ``aiohttp`` application:

* :func:`make_app` builds the application for a reward;
* :func:`serve` runs it until Ctrl+C or SIGTERM (what ``rlr serve-reward`` runs);
* :class:`BackgroundServer` runs an application on a thread of this process (notebooks, tests).

The reward runs under ``torch.no_grad()`` on one worker thread, so requests are scored one at a time (a GPU
runs one batch at a time anyway) while the event loop keeps receiving the next ones.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from aiohttp import web
from torch import Tensor

from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.rewards.protocol import (
    INFO_PATH,
    PROTOCOL_VERSION,
    SCORE_PATH,
    decode_request,
    encode_rewards,
)

logger = logging.getLogger(__name__)

#: The largest request body the server accepts by default, in MiB (a batch of 32 float32 images of 512 x 512
#: pixels is 96 MiB).
DEFAULT_MAX_REQUEST_MB = 1024

_REWARD_KEY = web.AppKey("reward", RewardModel)
_DEVICE_KEY = web.AppKey("device", torch.device)
_EXECUTOR_KEY = web.AppKey("executor", ThreadPoolExecutor)


def make_app(
    reward: RewardModel, device: str | torch.device = "cpu", max_request_mb: float = DEFAULT_MAX_REQUEST_MB
) -> web.Application:
    """The aiohttp application serving ``reward`` (frozen, moved to ``device``): ``POST /score``, ``GET /info``.

    Args:
        reward: The reward model to serve.
        device: Where the reward runs (``cpu``, ``cuda``, ``cuda:1``, ...); request images are moved there.
        max_request_mb: The largest request body accepted, in MiB (larger ones get HTTP 413).
    """
    if not max_request_mb > 0:
        raise ValueError(f"max_request_mb must be > 0, got {max_request_mb}")
    device = torch.device(device)
    app = web.Application(client_max_size=int(max_request_mb * 2**20))
    app[_REWARD_KEY] = reward.freeze().to(device)
    app[_DEVICE_KEY] = device
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
    app[_EXECUTOR_KEY] = executor

    async def shut_down_executor(app: web.Application) -> None:
        executor.shutdown(wait=True)

    app.on_cleanup.append(shut_down_executor)
    app.router.add_post(SCORE_PATH, _score)
    app.router.add_get(INFO_PATH, _info)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _info(request: web.Request) -> web.Response:
    reward = request.app[_REWARD_KEY]
    return web.json_response(
        {
            "reward": type(reward).__name__,
            "video": bool(reward.video),
            "differentiable": bool(reward.differentiable),
            "protocol": PROTOCOL_VERSION,
        }
    )


async def _score(request: web.Request) -> web.Response:
    reward = request.app[_REWARD_KEY]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as err:
        return _error(
            413,
            f"{err.text}: send fewer images per request (RemoteReward's batch_size) or raise "
            "the server's --max_request_mb",
        )
    try:
        images, prompts = decode_request(body, video=reward.video)
    except ValueError as err:
        logger.warning("Refused a request from %s: %s", request.remote, err)
        return _error(400, str(err))
    loop = asyncio.get_running_loop()
    device = request.app[_DEVICE_KEY]
    try:
        rewards = await loop.run_in_executor(
            request.app[_EXECUTOR_KEY], _run, reward, images, prompts, device
        )
    except Exception as err:  # the reward's own failure: the client sees it, the server log has the traceback
        logger.exception("%s failed on %d images", type(reward).__name__, images.shape[0])
        return _error(500, f"{type(reward).__name__} raised {type(err).__name__}: {err}")
    return web.json_response(encode_rewards(rewards))


def _run(reward: RewardModel, images: Tensor, prompts: Sequence[str], device: torch.device) -> Tensor:
    with torch.no_grad():  # per thread: set here, on the worker thread
        return reward(images.to(device), prompts)


class BackgroundServer:
    """An aiohttp application served on a thread of this process: ``with BackgroundServer(app) as server:``
    serves at ``server.url`` until the block ends.

    Args:
        app: The application (e.g. :func:`make_app`'s).
        host: The address to listen on.
        port: The port; 0 picks a free one (``server.port`` then says which).
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        """Start serving; returns once the server listens (``OSError`` if the port cannot be bound)."""
        if self._thread is not None:
            raise RuntimeError(f"the server at {self.url} is already running")
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
        except BaseException:
            loop.run_until_complete(runner.cleanup())
            loop.close()
            raise
        self.port = _bound_port(runner)
        self._loop, self._runner = loop, runner
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"reward-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (requests under way are answered first) and release the port."""
        loop, runner, thread = self._loop, self._runner, self._thread
        if loop is None or runner is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._loop = self._runner = self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bound_port(runner: web.AppRunner) -> int:
    """The port the runner's site listens on (the free one picked for port 0)."""
    address = runner.addresses[0]
    return int(address[1])


def served_url(host: str, port: int) -> str:
    """The URL clients use for a server listening on ``host``: this machine's name for every address."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    reward: RewardModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | torch.device = "cpu",
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
) -> None:
    """Serve ``reward`` at ``http://host:port`` until Ctrl+C or SIGTERM; logs the URL once it listens.

    Args:
        reward: The reward model to serve.
        host: The address to listen on (``0.0.0.0``: every interface; the default, this machine only).
        port: The port; 0 picks a free one (the logged URL says which).
        device: Where the reward runs.
        max_request_mb: The largest request body accepted, in MiB.
    """
    asyncio.run(_serve(make_app(reward, device, max_request_mb), reward, host, port))


async def _serve(app: web.Application, reward: RewardModel, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Signal handlers can only be set on the main thread; elsewhere the caller stops the loop.
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as err:
            raise OSError(
                f"cannot listen on {host}:{port} ({err.strerror or err}): choose another --port "
                "(0 picks a free one) or stop what uses it"
            ) from None
        url = served_url(host, _bound_port(runner))
        kind = "videos" if reward.video else "images"
        logger.info(
            "Serving %s (%s) on %s: train with --model.reward rlr_lightning.rewards.RemoteReward "
            "--model.reward.init_args.url %s%s; Ctrl+C stops",
            type(reward).__name__,
            kind,
            url,
            url,
            " --model.reward.init_args.video true" if reward.video else "",
        )
        await stop.wait()
        logger.info("Stopping the reward server at %s", url)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])  # asyncio would leave the default, not what was there
        await runner.cleanup()
