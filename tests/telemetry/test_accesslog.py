"""Access log: JSON and Envoy TEXT lines, stdout and file output, failures that never reach the request."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from meshlib import MeshError
from meshlib.policy._meshkinds import AccessLogSettings
from meshlib.telemetry._accesslog import AccessLog, AccessLogError, format_json, format_text
from meshlib.telemetry._record import RequestRecord

START = 1714564800.123456  # 2024-05-01T12:00:00.123Z


def _full_record(**overrides: object) -> RequestRecord:
    fields: dict[str, object] = {
        "reporter": "destination",
        "source_workload": "frontend",
        "source_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/frontend",
        "destination_service": "reviews.shop.svc.cluster.local",
        "destination_workload": "reviews-v2",
        "destination_namespace": "shop",
        "destination_subset": "v2",
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/reviews",
        "request_protocol": "http",
        "response_code": 503,
        "response_flags": "UO,URX",
        "connection_security_policy": "mutual_tls",
        "start_time": START,
        "duration": 0.0429,
        "method": "GET",
        "path": "/reviews/1?x=2",
        "authority": "reviews.shop:9080",
        "upstream_host": "10.0.0.7:9080",
        "attempts": 3,
        "bytes_received": 12,
        "bytes_sent": 345,
        "authz_policy": "shop/allow-frontend",
        "audit": "shop/audit-all",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "user_agent": "python-httpx/0.27",
        "request_id": "a1b2c3",
    }
    fields.update(overrides)
    return RequestRecord(**fields)  # type: ignore[arg-type]


# Envoy's default format, one capture group per operator.
ENVOY_DEFAULT = re.compile(
    r"^\[(?P<start_time>[^\]]+)\] "
    r'"(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" '
    r"(?P<response_code>\d+) (?P<response_flags>\S+) (?P<response_code_details>\S+) "
    r"(?P<connection_termination_details>\S+) "
    r'"(?P<upstream_transport_failure_reason>[^"]*)" '
    r"(?P<bytes_received>\d+) (?P<bytes_sent>\d+) (?P<duration>\d+) (?P<upstream_service_time>\S+) "
    r'"(?P<x_forwarded_for>[^"]*)" "(?P<user_agent>[^"]*)" "(?P<request_id>[^"]*)" '
    r'"(?P<authority>[^"]*)" "(?P<upstream_host>[^"]*)" '
    r"(?P<upstream_cluster>\S+) (?P<upstream_local_address>\S+) (?P<downstream_local_address>\S+) "
    r"(?P<downstream_remote_address>\S+) (?P<requested_server_name>\S+) (?P<route_name>\S+)$"
)
ALWAYS_DASH = (
    "response_code_details",
    "connection_termination_details",
    "upstream_transport_failure_reason",
    "upstream_service_time",
    "x_forwarded_for",
    "upstream_cluster",
    "upstream_local_address",
    "downstream_local_address",
    "downstream_remote_address",
    "requested_server_name",
    "route_name",
)


# ---------------------------------------------------------------------- JSON


def test_json_line_carries_envoy_istio_fields() -> None:
    line = format_json(_full_record())
    assert "\n" not in line
    entry = json.loads(line)
    assert entry == {
        "start_time": "2024-05-01T12:00:00.123Z",
        "method": "GET",
        "path": "/reviews/1?x=2",
        "protocol": "http",
        "response_code": 503,
        "response_flags": "UO,URX",
        "duration": 42,
        "bytes_received": 12,
        "bytes_sent": 345,
        "upstream_host": "10.0.0.7:9080",
        "authority": "reviews.shop:9080",
        "user_agent": "python-httpx/0.27",
        "request_id": "a1b2c3",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/frontend",
        "source_workload": "frontend",
        "source_namespace": "shop",
        "destination_service": "reviews.shop.svc.cluster.local",
        "destination_workload": "reviews-v2",
        "destination_namespace": "shop",
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/reviews",
        "destination_subset": "v2",
        "connection_security_policy": "mutual_tls",
        "reporter": "destination",
        "attempts": 3,
        "authz_policy": "shop/allow-frontend",
        "audit": "shop/audit-all",
    }


def test_json_missing_values_are_null_and_keys_are_stable() -> None:
    full = json.loads(format_json(_full_record()))
    entry = json.loads(format_json(RequestRecord(reporter="source")))
    assert entry.keys() == full.keys()
    assert entry["reporter"] == "source"
    assert entry["response_flags"] == "-"
    assert entry["response_code"] == 0
    assert entry["audit"] is False
    for key in ("start_time", "method", "path", "upstream_host", "source_workload", "destination_subset", "trace_id"):
        assert entry[key] is None, key
    assert entry["connection_security_policy"] is None


def test_start_time_is_utc_with_milliseconds_across_seconds() -> None:
    first = json.loads(format_json(_full_record(start_time=START)))["start_time"]
    second = json.loads(format_json(_full_record(start_time=START + 1.5)))["start_time"]
    assert first == "2024-05-01T12:00:00.123Z"
    assert second == "2024-05-01T12:00:01.623Z"


# ---------------------------------------------------------------------- TEXT


def test_text_matches_envoy_default_format() -> None:
    match = ENVOY_DEFAULT.match(format_text(_full_record()))
    assert match is not None
    fields = match.groupdict()
    assert fields["start_time"] == "2024-05-01T12:00:00.123Z"
    assert (fields["method"], fields["path"], fields["protocol"]) == ("GET", "/reviews/1?x=2", "http")
    assert (fields["response_code"], fields["response_flags"]) == ("503", "UO,URX")
    assert (fields["bytes_received"], fields["bytes_sent"], fields["duration"]) == ("12", "345", "42")
    assert fields["user_agent"] == "python-httpx/0.27"
    assert fields["request_id"] == "a1b2c3"
    assert fields["authority"] == "reviews.shop:9080"
    assert fields["upstream_host"] == "10.0.0.7:9080"
    for name in ALWAYS_DASH:
        assert fields[name] == "-", name


def test_text_dashes_what_the_record_lacks() -> None:
    match = ENVOY_DEFAULT.match(format_text(RequestRecord(reporter="source")))
    assert match is not None
    fields = match.groupdict()
    for name in ("start_time", "method", "path", "response_flags", "user_agent", "request_id", "authority"):
        assert fields[name] == "-", name
    assert fields["upstream_host"] == "-"
    assert fields["response_code"] == "0"


def test_text_escapes_what_would_break_the_line() -> None:
    line = format_text(_full_record(user_agent='evil"\nagent\\', path="/a b"))
    assert "\n" not in line
    assert '"evil\\"\\x0aagent\\\\"' in line


# ---------------------------------------------------------------------- output


def test_off_by_default_as_in_istio(capsys: pytest.CaptureFixture[str]) -> None:
    with AccessLog(AccessLogSettings()) as access_log:
        access_log.write(_full_record())
    assert capsys.readouterr().out == ""


def test_enabled_without_a_path_writes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    access_log = AccessLog(AccessLogSettings(enabled=True))
    access_log.write(_full_record())
    access_log.write(_full_record(reporter="source"))
    access_log.close()
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["reporter"] for line in lines] == ["destination", "source"]


def test_text_format_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    with AccessLog(AccessLogSettings(enabled=True, format="TEXT")) as access_log:
        access_log.write(_full_record())
    assert ENVOY_DEFAULT.match(capsys.readouterr().out.rstrip("\n"))


def test_file_appends_lines_and_is_0644(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    old_umask = os.umask(0o077)  # the mode must not depend on the process umask
    try:
        with AccessLog(AccessLogSettings(path=str(path))) as access_log:
            access_log.write(_full_record())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    with AccessLog(AccessLogSettings(path=str(path))) as access_log:  # reopening appends
        access_log.write(_full_record(reporter="source"))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["reporter"] for line in lines] == ["destination", "source"]


def test_missing_directory_is_a_clear_error_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "access.log"
    with pytest.raises(AccessLogError, match=re.escape(str(path))) as info:
        AccessLog(AccessLogSettings(path=str(path)))
    assert isinstance(info.value, MeshError)
    assert "No such file or directory" in str(info.value)


def test_disabled_writes_nothing_and_opens_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "access.log"
    for settings in (AccessLogSettings(enabled=False), AccessLogSettings(enabled=False, path=str(path))):
        access_log = AccessLog(settings)
        access_log.write(_full_record())
        access_log.close()
    assert capsys.readouterr().out == ""
    assert not path.exists()


def test_write_after_close_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access_log = AccessLog(AccessLogSettings(path=str(path)))
    access_log.close()
    access_log.close()
    access_log.write(_full_record())
    assert access_log.dropped == 1
    assert path.read_text() == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_io_error_is_logged_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="meshlib.access"), AccessLog(AccessLogSettings(path="/dev/full")) as al:
        for _ in range(3):
            al.write(_full_record())  # ENOSPC: must not raise
    assert al.dropped == 3
    errors = [r for r in caplog.records if r.name == "meshlib.access"]
    assert len(errors) == 1
    assert "/dev/full" in errors[0].getMessage()


def test_concurrent_writers_produce_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    threads_n, per_thread = 8, 300
    # Long values make a torn or interleaved write visible as a line that does not parse.
    big = "x" * 2000
    with AccessLog(AccessLogSettings(path=str(path))) as access_log:
        barrier = threading.Barrier(threads_n)

        def writer(n: int) -> None:
            barrier.wait()
            for i in range(per_thread):
                access_log.write(_full_record(request_id=f"{n}-{i}", user_agent=big))

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    lines = path.read_text().splitlines()
    assert len(lines) == threads_n * per_thread
    ids = {json.loads(line)["request_id"] for line in lines}
    assert ids == {f"{n}-{i}" for n in range(threads_n) for i in range(per_thread)}
