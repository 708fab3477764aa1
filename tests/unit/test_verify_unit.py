"""node/verify.py without a broker: the accounting, ids, the chaos schedule and its thread
(with a fake runner), the shell runner, the summary, and argument errors."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from click.testing import CliRunner

from node.logs import EventLogger
from node.verify import (
    Chaos,
    ChaosPlan,
    ChaosStep,
    Copies,
    Ledger,
    Summary,
    Tally,
    account,
    attempt_id,
    check_url,
    exit_status,
    format_summary,
    make_body,
    parse_attempt_id,
    parse_nodes,
    plan_chaos,
    run_shell,
    safe_url,
    verify_command,
)

LOG = EventLogger(logging.getLogger("test.verify"))

# --- accounting -----------------------------------------------------------------------------


def test_a_clean_run_counts_every_message_once() -> None:
    tally = account(3, [1, 1, 1], [0, 1, 2], {(0, 1): [False], (1, 1): [False], (2, 1): [False]})
    assert tally == Tally(
        count=3,
        published=3,
        confirmed=3,
        received=3,
        lost=0,
        duplicates=0,
        duplicates_unflagged=0,
        unconfirmed_received=0,
        republished=0,
        lost_sample=(),
    )


def test_a_confirmed_message_never_received_is_lost() -> None:
    tally = account(4, [1, 1, 1, 1], [0, 1, 2, 3], {(0, 1): [False], (2, 1): [False]})
    assert (tally.lost, tally.lost_sample, tally.received) == (2, (1, 3), 2)


def test_an_unconfirmed_message_that_arrives_is_not_a_loss() -> None:
    # 1 was never confirmed but arrived; 2 was never confirmed and never arrived.
    tally = account(3, [1, 1, 1], [0], {(0, 1): [False], (1, 1): [False]})
    assert (tally.confirmed, tally.received, tally.lost, tally.unconfirmed_received) == (
        1,
        2,
        0,
        1,
    )


def test_any_received_attempt_saves_a_confirmed_message() -> None:
    # Attempt 1 was confirmed, yet only attempt 2 (republished after a lost confirm) arrived.
    tally = account(1, [2], [0], {(0, 2): [False]})
    assert (tally.lost, tally.received, tally.republished, tally.published) == (0, 1, 1, 2)


def test_extra_copies_are_duplicates_and_unflagged_ones_are_counted_apart() -> None:
    copies = {
        (0, 1): [False, True, True],  # two flagged redeliveries
        (1, 1): [False, False],  # a copy the broker did not flag
        (2, 1): [True],  # one copy, flagged: not a duplicate
    }
    tally = account(3, [1, 1, 1], [0, 1, 2], copies)
    assert (tally.duplicates, tally.duplicates_unflagged) == (3, 1)


def test_copies_of_different_attempts_are_not_duplicates() -> None:
    tally = account(1, [3], [0], {(0, 1): [False], (0, 3): [False]})
    assert (tally.duplicates, tally.received, tally.republished) == (0, 1, 2)


def test_the_lost_sample_is_the_first_ten() -> None:
    tally = account(50, [1] * 50, range(50), {})
    assert tally.lost == 50
    assert tally.lost_sample == tuple(range(10))


def test_the_ledger_feeds_the_accounting() -> None:
    ledger = Ledger(3)
    assert [ledger.next_attempt(i, 10.0) for i in (0, 1, 1)] == [1, 1, 2]
    ledger.receive(1, 1, False)
    assert ledger.confirm(1, 11.0)
    assert not ledger.confirm(1, 11.5)  # only the first confirm of a message counts
    ledger.receive(1, 2, True)
    ledger.receive(2, 1, False)  # never published in this ledger's view: still received
    assert (ledger.confirmed_count, ledger.received_count, ledger.received_confirmed) == (1, 2, 1)
    assert ledger.published == 3
    assert ledger.publish_seconds == pytest.approx(1.0)
    tally = ledger.tally()
    assert (tally.confirmed, tally.received, tally.unconfirmed_received, tally.republished) == (
        1,
        2,
        1,
        1,
    )


def test_the_ledger_reports_an_unflagged_duplicate_with_both_copies() -> None:
    ledger = Ledger(2)
    first = 1_796_200_000.25  # 2026-12-02T08:26:40.250Z
    assert ledger.receive(0, 1, False, first, 1) is None
    assert ledger.receive(0, 1, True, first + 1, 2) is None  # flagged: owned up to
    assert ledger.receive(1, 1, False, first, 1) is None
    report = ledger.receive(0, 1, False, first + 2.5, 3)
    assert report == Copies(0, 1, 3, first, 1, first + 2.5, 3)
    assert ledger.unflagged == [report]
    assert report.to_json() == {
        "message": 0,
        "attempt": 1,
        "copy": 3,
        "first_at": "2026-12-02T08:26:40.250Z",
        "first_subscription": 1,
        "at": "2026-12-02T08:26:42.750Z",
        "subscription": 3,
    }
    # A copy of another attempt is not a duplicate, flagged or not.
    assert ledger.receive(1, 2, False, first + 3, 3) is None
    summary = _summary(ledger.tally(), unflagged_sample=tuple(ledger.unflagged))
    assert summary.to_json()["unflagged_sample"] == [report.to_json()]
    assert summary.tally.duplicates_unflagged == 1
    table = format_summary(summary)
    assert "message 0 attempt 1: 2026-12-02T08:26:40.250Z (subscription 1)" in table


# --- ids and bodies ---------------------------------------------------------------------------


def test_attempt_ids_round_trip_and_other_runs_do_not_parse() -> None:
    mid = attempt_id("abc123", 42, 3)
    assert mid == "abc123:42:3"
    assert parse_attempt_id(mid, "abc123") == (42, 3)
    assert parse_attempt_id(mid, "other") is None
    for text in ("", "abc123", "abc123:1", "abc123:x:1", "abc123:1:2:3", "abc123:-1:1"):
        assert parse_attempt_id(text, "abc123") is None


def test_the_body_starts_with_the_id_and_has_the_size() -> None:
    assert make_body("r:1:1", 64) == b"r:1:1|" + b"x" * 58
    assert make_body("r:1:1", 0) == b"r:1:1|"  # never shorter than the id


# --- arguments and the chaos schedule -------------------------------------------------------


def test_chaos_takes_the_nodes_round_robin_and_restarts_the_same_one() -> None:
    plan = plan_chaos("docker kill {node}", "docker start {node}", "a, b,,c", 5.0, 2.0)
    assert plan == ChaosPlan("docker kill {node}", "docker start {node}", ("a", "b", "c"), 5, 2)
    assert [plan.step(k) for k in range(4)] == [
        ChaosStep("a", "docker kill a", "docker start a"),
        ChaosStep("b", "docker kill b", "docker start b"),
        ChaosStep("c", "docker kill c", "docker start c"),
        ChaosStep("a", "docker kill a", "docker start a"),
    ]


def test_chaos_without_nodes_runs_the_command_as_written() -> None:
    plan = plan_chaos("awk '{print}' /dev/null", None, None, 1.0, 0.0)
    assert plan is not None
    assert plan.step(7) == ChaosStep("", "awk '{print}' /dev/null", None)


@pytest.mark.parametrize(
    ("chaos", "restart", "nodes", "every", "down", "message"),
    [
        (None, "x", None, 5, 2, "--restart needs --chaos"),
        (None, None, "a", 5, 2, "--chaos-nodes needs --chaos"),
        ("kill {node}", None, None, 5, 2, "--chaos uses {node} but --chaos-nodes names no node"),
        ("kill", "start {node}", "", 5, 2, "--chaos uses {node} but --chaos-nodes names no node"),
        ("kill {node}", None, "a;b", 5, 2, "--chaos-nodes: 'a;b' is not a plain node name"),
        ("kill {node}", None, "a b", 5, 2, "--chaos-nodes: 'a b' is not a plain node name"),
        ("kill", None, None, 0, 2, "--chaos-every must be more than 0 seconds"),
        ("kill", None, None, 5, -1, "--down must not be negative"),
    ],
)
def test_chaos_options_that_do_not_fit_together(
    chaos: str | None,
    restart: str | None,
    nodes: str | None,
    every: float,
    down: float,
    message: str,
) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("{", r"\{").replace("}", r"\}")):
        plan_chaos(chaos, restart, nodes, every, down)


def test_no_chaos_options_no_plan() -> None:
    assert plan_chaos(None, None, None, 5, 2) is None


def test_node_names_are_plain_words() -> None:
    assert parse_nodes("warren-1,rabbit@host,n_2.local:1") == (
        "warren-1",
        "rabbit@host",
        "n_2.local:1",
    )
    with pytest.raises(ValueError, match="plain node name"):
        parse_nodes("a,$(rm -rf /)")


@pytest.mark.parametrize(
    "url", ["amqp://guest:guest@127.0.0.1:5672/%2F", "amqps://h/", "amqp://[::1]:5673/v"]
)
def test_good_urls(url: str) -> None:
    check_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:5672/", "expected amqp://HOST"),
        ("127.0.0.1:5672", "expected amqp://HOST"),
        ("amqp:///vhost", "no host"),
        ("amqp://h:99999/", "Port out of range"),
        ("amqp://u:secret@h:0/", "port 0"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        check_url(url)
    assert "secret" not in str(info.value)


def test_passwords_stay_out_of_logged_urls() -> None:
    assert (
        safe_url("amqp://guest:guest@127.0.0.1:5672/%2F") == "amqp://guest:***@127.0.0.1:5672/%2F"
    )
    assert safe_url("amqp://[::1]/") == "amqp://[::1]/"
    assert safe_url("amqp://u:p@[::1]:5/") == "amqp://u:***@[::1]:5/"


# --- the summary ----------------------------------------------------------------------------


def _summary(
    tally: Tally,
    publisher_reconnects: int = 0,
    consumer_reconnects: int = 0,
    unflagged_sample: tuple[Copies, ...] = (),
) -> Summary:
    return Summary(
        "r",
        "q",
        "quorum",
        tally,
        "drained",
        publish_seconds=2.0,
        elapsed_seconds=3.0,
        publisher_reconnects=publisher_reconnects,
        consumer_reconnects=consumer_reconnects,
        unflagged_sample=unflagged_sample,
    )


def test_exit_status_fails_on_loss_unflagged_duplicates_or_an_incomplete_run() -> None:
    clean = account(2, [1, 1], [0, 1], {(0, 1): [False], (1, 1): [False]})
    assert exit_status(_summary(clean)) == 0
    flagged = account(1, [1], [0], {(0, 1): [False, True]})
    assert exit_status(_summary(flagged)) == 0
    unflagged = account(1, [1], [0], {(0, 1): [False, False]})
    assert exit_status(_summary(unflagged)) == 1
    lost = account(2, [1, 1], [0, 1], {(0, 1): [False]})
    assert exit_status(_summary(lost)) == 1
    incomplete = account(2, [1, 1], [0], {(0, 1): [False]})
    assert _summary(incomplete).problems() == ["only 1 of 2 confirmed"]
    assert exit_status(_summary(incomplete)) == 1


def test_the_json_summary_is_flat_and_has_the_totals() -> None:
    tally = account(4, [1, 2, 1, 1], [0, 1, 2], {(0, 1): [False], (1, 2): [False, True]})
    value = _summary(tally, publisher_reconnects=2, consumer_reconnects=1).to_json()
    assert json.loads(json.dumps(value)) == value
    assert value["confirmed"] == 3
    assert value["received"] == 2
    assert value["lost"] == 1
    assert value["lost_sample"] == [2]
    assert value["duplicates"] == 1
    assert value["republished"] == 1
    assert value["reconnects"] == 3
    assert value["publish_rate"] == 1.5
    assert value["complete"] is False
    assert value["ok"] is False


def test_the_table_says_what_failed() -> None:
    tally = account(2, [1, 1], [0, 1], {(0, 1): [False]})
    text = format_summary(_summary(tally))
    lines = text.splitlines()
    assert lines[0] == "warren verify: run r, queue q (quorum)"
    assert any(line.split()[:2] == ["lost", "1"] for line in lines)
    assert lines[-1].split(None, 1) == ["result", "FAILED: 1 confirmed message(s) lost"]


# --- the chaos thread and the shell runner ---------------------------------------------------


class FakeRunner:
    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.commands: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, command: str, timeout: float) -> tuple[int, str]:
        with self.lock:
            self.commands.append(command)
        return self.status, "some output"

    def wait_for(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.commands) < n:
            assert time.monotonic() < deadline, self.commands
            time.sleep(0.005)


def test_chaos_runs_each_step_and_its_restart_in_order() -> None:
    runner = FakeRunner()
    chaos = Chaos(ChaosPlan("kill {node}", "start {node}", ("a", "b"), 0.01, 0.0), LOG, runner)
    chaos.start()
    runner.wait_for(6)
    chaos.stop()
    assert chaos.join(5.0)
    assert runner.commands[:6] == ["kill a", "start a", "kill b", "start b", "kill a", "start a"]
    assert len(runner.commands) % 2 == 0  # the last kill got its restart
    assert chaos.events == chaos.restarts == len(runner.commands) // 2
    assert chaos.failures == 0


def test_stopping_during_the_down_time_still_restarts_the_node() -> None:
    runner = FakeRunner()
    chaos = Chaos(ChaosPlan("kill", "start", (), 0.01, 0.3), LOG, runner)
    chaos.start()
    runner.wait_for(1)
    chaos.stop()
    started = time.monotonic()
    assert chaos.join(5.0)
    assert runner.commands == ["kill", "start"]
    assert time.monotonic() - started > 0.1  # it waited out the down time


def test_hurry_restarts_at_once() -> None:
    runner = FakeRunner()
    chaos = Chaos(ChaosPlan("kill", "start", (), 0.01, 30.0), LOG, runner)
    chaos.start()
    runner.wait_for(1)
    chaos.hurry()
    assert chaos.join(2.0)
    assert runner.commands == ["kill", "start"]


def test_nothing_runs_before_the_first_interval() -> None:
    runner = FakeRunner()
    chaos = Chaos(ChaosPlan("kill", None, (), 10.0, 0.0), LOG, runner)
    chaos.start()
    chaos.stop()
    assert chaos.join(2.0)
    assert runner.commands == []


def test_a_failing_command_is_counted_and_chaos_goes_on() -> None:
    runner = FakeRunner(status=3)
    chaos = Chaos(ChaosPlan("kill", None, (), 0.01, 0.0), LOG, runner)
    chaos.start()
    runner.wait_for(3)
    chaos.stop()
    assert chaos.join(2.0)
    assert chaos.failures == chaos.events >= 3


def test_run_shell_reports_status_and_output() -> None:
    assert run_shell("echo out; echo err >&2; exit 4", 5.0) == (4, "out\nerr\n")


def test_run_shell_does_not_wait_for_a_daemon_the_command_leaves_behind() -> None:
    started = time.monotonic()
    status, output = run_shell("sleep 3 & echo started", 5.0)
    assert (status, output) == (0, "started\n")
    assert time.monotonic() - started < 1.0


def test_run_shell_kills_a_command_that_overruns() -> None:
    started = time.monotonic()
    status, output = run_shell("echo begun; sleep 30", 0.2)
    assert status == -1
    assert output.startswith("timed out after 0.2 s; begun")
    assert time.monotonic() - started < 3.0


# --- argument errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "0"], "Invalid value for '--count'"),
        (["--inflight", "x"], "Invalid value for '--inflight'"),
        (["--queue-type", "stream"], "Invalid value for '--queue-type'"),
        (["--bogus"], "No such option"),
        (["--restart", "start"], "--restart needs --chaos"),
        (["--url", "http://h/"], "--url 'http://h/': expected amqp://HOST"),
        (["--url", "amqp://h/?heartbeat=soon"], "--url: ValueError: Invalid heartbeat value"),
        (["--queue", ""], "--queue: a name of 1 to 255 bytes"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(verify_command, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"warren verify: {message}"), result.stderr
