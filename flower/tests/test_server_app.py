"""Unit tests of the ServerApp's pieces that need flwr but no SuperLink.

Run by `cargo xtask deploy-check` in the deployment venv, from `flower/`:
`../target/deploy-venv/bin/python -m unittest discover -s tests`.
"""

import time
import unittest
from types import SimpleNamespace
from unittest import mock

from fedsvd_flower.server_app import REPLY_POLL_SECONDS, PromptGrid


class FakeGrid:
    """Replies to message `i` from the `ready_after[i]`-th pull on (never
    when None); records every pull."""

    def __init__(self, ready_after: list[int | None]) -> None:
        self.ready_after = ready_after
        self.pulls = 0
        self.delivered: set[str] = set()

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in sorted(message_ids):
            due = self.ready_after[int(mid[1:])]
            if due is not None and self.pulls >= due and mid not in self.delivered:
                self.delivered.add(mid)
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)))
        return out

    def get_node_ids(self):
        return [1, 2]


class PromptGridTest(unittest.TestCase):
    def test_collects_every_reply_once_without_flwrs_three_second_sleeps(self) -> None:
        inner = FakeGrid([1, 3, 4])
        with mock.patch("fedsvd_flower.server_app.time.sleep") as sleep:
            replies = PromptGrid(inner).send_and_receive(["a", "b", "c"], timeout=60)
        got = sorted(r.metadata.reply_to_message_id for r in replies)
        self.assertEqual(got, ["m0", "m1", "m2"])
        self.assertEqual(inner.pulls, 4, "stops pulling once every reply is in")
        # flwr's own loop sleeps 3 s between pulls.
        self.assertEqual([c.args for c in sleep.call_args_list], [(REPLY_POLL_SECONDS,)] * 3)

    def test_returns_what_came_in_by_the_timeout(self) -> None:
        inner = FakeGrid([2, None])
        started = time.monotonic()
        replies = PromptGrid(inner).send_and_receive(["a", "b"], timeout=1.0)
        elapsed = time.monotonic() - started
        self.assertEqual([r.metadata.reply_to_message_id for r in replies], ["m0"])
        self.assertGreaterEqual(elapsed, 1.0)
        # Ends at the first pull past the deadline, not after a long sleep.
        self.assertLess(elapsed, 1.0 + 3.0)

    def test_forwards_the_rest_to_flwrs_grid(self) -> None:
        self.assertEqual(list(PromptGrid(FakeGrid([])).get_node_ids()), [1, 2])


if __name__ == "__main__":
    unittest.main()
