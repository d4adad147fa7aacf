"""``RemoteReward``: a reward scored by a reward server over HTTP (``rlr serve-reward``, :mod:`.server`).

The images travel at their own floating precision (float32 in the shipped configs), so the rewards equal
the served reward's in-process rewards exactly. What happens when the server misbehaves:

* no answer within ``timeout_s``, no connection, or an HTTP 5xx answer: the request is tried again after
  ``backoff_s``, ``2 * backoff_s``, ``4 * backoff_s``, ... (``max_retries`` times); then
  :class:`RewardServerError` names the URL, the tries and the last cause, and ``rlr fit`` stops with it
  (exit status 1; the checkpoints already written stay, resume from ``last.ckpt`` with ``--ckpt_path``);
* an HTTP 4xx answer (a request the server refuses) or a URL that is not a reward server:
  :class:`RewardRequestError` at once, with the server's message;
* an answer that is not JSON, has the wrong number of rewards, or rewards that are not finite numbers: those
  images get NaN rewards and a warning says what was wrong; training then skips the update and counts it
  (``train/skipped_updates``), as for any non-finite reward.

The reward has no gradient over HTTP (``differentiable = False``): RLR scores its last step by a likelihood
ratio, and backprop estimators refuse it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.rewards.protocol import CONTENT_TYPE, INFO_PATH, SCORE_PATH, encode_request

if TYPE_CHECKING:
    import requests

logger = logging.getLogger(__name__)

#: How many characters of a server's answer a message quotes.
_QUOTE = 120
_ERRNO = re.compile(r"\[Errno -?\d+\][^'\")]*")
_REMOTE_END = re.compile(r"(Remote end closed connection without response|Connection reset by peer)")


class RewardServerError(ConnectionError):
    """The reward server did not answer: every try timed out, could not connect or got an HTTP 5xx answer."""


class RewardRequestError(ValueError):
    """The reward server refused a request (HTTP 4xx), or the URL does not serve a reward model of this kind."""


class RemoteReward(RewardModel):
    """A reward model served over HTTP by ``rlr serve-reward`` (or :func:`rlr_lightning.rewards.server.serve`).

    Images (or videos) are sent in requests of at most ``batch_size``; each request is tried again with
    exponential backoff when the server does not answer, and the run stops with :class:`RewardServerError`
    (naming the URL) when it never does. Malformed answers and non-finite rewards become NaN rewards, so the
    update is skipped and logged (``train/skipped_updates``). Not differentiable: RLR scores its last step by a
    likelihood ratio. docs/remote_rewards.md has the details.

    Args:
        url: The reward server's address, e.g. ``http://127.0.0.1:8000`` (what ``rlr serve-reward`` logs).
        timeout_s: Seconds to wait for a connection and then for each answer (a request scoring ``batch_size``
            images must finish within it).
        max_retries: How many times a request that timed out, could not connect or got an HTTP 5xx answer is
            tried again before the run stops.
        backoff_s: Seconds to wait before the first retry; each further retry waits twice as long.
        batch_size: The most images (or videos) per request; larger batches are split.
        video: Whether the served reward scores videos ``(B, F, 3, H, W)`` (checked against the server).
    """

    differentiable = False

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        batch_size: int = 32,
        video: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(
                f"url must be an http:// or https:// address such as http://127.0.0.1:8000, got {url!r}"
            )
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0 seconds, got {backoff_s}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.backoff_s = float(backoff_s)
        self.batch_size = batch_size
        self.video = bool(video)
        #: The server's ``/info`` answer, once checked (the first call asks for it).
        self.server_info: dict[str, Any] | None = None
        self._session: requests.Session | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A session holds open sockets: copies (pickling for spawned processes, deepcopy) open their own.
        state = super().__getstate__()
        state["_session"] = None
        return state

    def extra_repr(self) -> str:
        return f"url={self.url!r}, video={self.video}"

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            import requests  # here: rlr_lightning.rewards loads without the client's dependency

            self._session = requests.Session()
        return self._session

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        self.check_server()
        rewards = torch.empty(images.shape[0], dtype=torch.float32)
        problems: list[str] = []
        for start in range(0, images.shape[0], self.batch_size):
            stop = min(start + self.batch_size, images.shape[0])
            body = encode_request(images[start:stop], prompts[start:stop])
            response = self._request("POST", SCORE_PATH, data=body, headers={"Content-Type": CONTENT_TYPE})
            rewards[start:stop], problem = _read_rewards(response, stop - start)
            if problem is not None:
                problems.append(
                    f"images {start}-{stop - 1}: {problem}" if images.shape[0] > stop - start else problem
                )
        if problems:
            logger.warning(
                "Reward server %s gave a malformed answer (%s): those images get NaN rewards (in training the "
                "update is skipped, and train/skipped_updates counts it)",
                self.url,
                "; ".join(problems),
            )
        return rewards.to(images.device)

    def check_server(self) -> dict[str, Any]:
        """Ask the server what it serves (once) and refuse a video reward for images or the reverse."""
        if self.server_info is not None:
            return self.server_info
        response = self._request("GET", INFO_PATH)
        try:
            info = response.json()
            name, served_video = str(info["reward"]), info["video"]
            if not isinstance(served_video, bool):
                raise TypeError(f"video is {served_video!r}")
        except (ValueError, KeyError, TypeError):
            raise RewardRequestError(
                f"{self.url}{INFO_PATH} answered {_quote(response.text)}, not a reward server's description: "
                f"is {self.url} the address rlr serve-reward logged?"
            ) from None
        if served_video != self.video:
            served, expected = ("videos", "images") if served_video else ("images", "videos")
            raise RewardRequestError(
                f"the reward server {self.url} serves {name}, which scores {served}, but RemoteReward was set up "
                f"for {expected} (video={self.video}): set model.reward.init_args.video={str(served_video).lower()}"
            )
        logger.info("Scoring rewards with %s served at %s", name, self.url)
        self.server_info = info
        return info

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The server's answer to one request, tried again with backoff while it does not come."""
        import requests

        url = self.url + path
        tries = self.max_retries + 1
        cause = ""
        for attempt in range(tries):
            try:
                response = self.session.request(method, url, timeout=self.timeout_s, **kwargs)
            except requests.Timeout:
                cause = f"no answer within timeout_s={self.timeout_s:g} s"
            except requests.RequestException as err:
                cause = f"connection failed: {_reason(err)}"
            else:
                if response.status_code < 400:
                    return response
                message = _server_message(response)
                if response.status_code < 500:
                    raise RewardRequestError(
                        f"the reward server {url} refused the request (HTTP {response.status_code}): {message}"
                    )
                cause = f"HTTP {response.status_code}: {message}"
            if attempt + 1 < tries:
                wait = self.backoff_s * 2**attempt
                logger.warning(
                    "Reward server %s: try %d of %d failed (%s); trying again in %.3g s",
                    url,
                    attempt + 1,
                    tries,
                    cause,
                    wait,
                )
                time.sleep(wait)
        raise RewardServerError(
            f"the reward server {url} failed {tries} tries (last cause: {cause}). Start it (rlr serve-reward "
            f"...) or fix model.reward.init_args.url, then resume the run from its last checkpoint with --ckpt_path "
            f".../checkpoints/last.ckpt; timeout_s, max_retries and backoff_s set how long to wait"
        )


def _read_rewards(response: requests.Response, count: int) -> tuple[Tensor, str | None]:
    """The rewards of an answer and what was wrong with it (``None``: nothing); NaN where unreadable."""
    nan = torch.full((count,), float("nan"))
    try:
        payload = response.json()
    except ValueError:
        return nan, f"not JSON: {_quote(response.text)}"
    values = payload.get("rewards") if isinstance(payload, dict) else None
    if not isinstance(values, list):
        return nan, f"no list of rewards: {_quote(response.text)}"
    if len(values) != count:
        return nan, f"{len(values)} rewards for {count} images"
    finite = [isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values]
    rewards = torch.tensor(
        [float(v) if ok else math.nan for v, ok in zip(values, finite)], dtype=torch.float32
    )
    if all(finite):
        return rewards, None
    bad = [v for v, ok in zip(values, finite) if not ok]
    return rewards, f"{len(bad)} of {count} rewards are not finite numbers (e.g. {_quote(repr(bad[0]))})"


def _server_message(response: requests.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return payload["error"]
    return _quote(response.text) if response.text else response.reason or "no message"


def _reason(err: BaseException) -> str:
    """The innermost reason of a failed connection, e.g. ``[Errno 111] Connection refused``."""
    text = str(err)
    for pattern in (_ERRNO, _REMOTE_END):
        match = pattern.search(text)
        if match:
            return match.group(0).strip()
    return _quote(text)


def _quote(text: str) -> str:
    return repr(text) if len(text) <= _QUOTE else f"{text[:_QUOTE]!r}... ({len(text)} characters)"
