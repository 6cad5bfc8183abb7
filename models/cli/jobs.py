"""``servery jobs``: batch jobs on a running servery (docs/batch.md), through its OpenAI Files
and Batch API.

    servery jobs submit FILE --endpoint /predict [--window 24h] [--wait] [--output OUT]
    servery jobs status ID [--wait]
    servery jobs list [--limit N]
    servery jobs cancel ID
    servery jobs download ID [--output OUT] [--errors ERR]

Every action takes ``--url`` (default http://127.0.0.1:3000) and ``--api-key`` (default
``$SERVERY_API_KEY``). ``--wait`` follows a job with a progress bar (lines answered of all)
until it ends; ``submit --wait --output`` then downloads its results. Exit 0 when the job
completed (or was submitted), 1 when it failed, expired or was cancelled, 2 for a refused call.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ENDED = ("completed", "failed", "expired", "cancelled")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("jobs", help="batch jobs: submit, status, list, cancel, download")
    sub = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    submit = sub.add_parser("submit", help="upload a JSONL file and start a batch on it")
    submit.add_argument("file", type=Path, help="JSONL: one {custom_id, method, url, body} a line")
    submit.add_argument(
        "--endpoint",
        required=True,
        help="/predict, /v2/models/{name}/infer, /v1/chat/completions, /v1/completions, "
        "/v1/embeddings",
    )
    submit.add_argument("--window", default="24h", help="completion window (default 24h)")
    submit.add_argument("--wait", action="store_true", help="follow it until it ends")
    submit.add_argument("--output", type=Path, help="with --wait: write the output file here")
    status = sub.add_parser("status", help="one job's status and counts")
    status.add_argument("id")
    status.add_argument("--wait", action="store_true", help="follow it until it ends")
    lst = sub.add_parser("list", help="your jobs, newest first, with progress")
    lst.add_argument("--limit", type=int, default=20)
    lst.add_argument("--json", action="store_true", help="the jobs as JSON on stdout")
    cancel = sub.add_parser("cancel", help="cancel a job (its answered lines are kept)")
    cancel.add_argument("id")
    down = sub.add_parser("download", help="write a job's output (and error) file")
    down.add_argument("id")
    down.add_argument("--output", type=Path, help="default: <id>_output.jsonl")
    down.add_argument("--errors", type=Path, help="default: <id>_errors.jsonl")
    for q in (submit, status, lst, cancel, down):
        q.add_argument("--url", default="http://127.0.0.1:3000", help="servery's address")
        q.add_argument(
            "--api-key",
            default=os.environ.get("SERVERY_API_KEY"),
            help="(default: $SERVERY_API_KEY)",
        )
        q.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


class Refused(Exception):
    """The server answered an error: its status and message."""


def _client(args: Any) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=60)


def _call(client: Any, method: str, path: str, **kw: Any) -> Any:
    r = client.request(method, path, **kw)
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise Refused(f"{method} {path}: {r.status_code} {message}")
    return r.json() if r.headers.get("content-type", "").startswith("application/json") else r


def _line(job: dict[str, Any]) -> str:
    c = job["request_counts"]
    return (
        f"{job['id']}  {job['status']:<11} {c['completed'] + c['failed']}/{c['total']} "
        f"(failed {c['failed']})  {job['endpoint']}  created "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job['created_at']))}"
    )


def _follow(client: Any, job_id: str, quiet: bool) -> dict[str, Any]:
    from tqdm import tqdm

    job = _call(client, "GET", f"/v1/batches/{job_id}")
    bar = tqdm(total=job["request_counts"]["total"], unit="line", disable=quiet, file=sys.stderr)
    with bar:
        while True:
            c = job["request_counts"]
            bar.n = c["completed"] + c["failed"]
            bar.set_postfix_str(f"{job['status']}, failed {c['failed']}", refresh=True)
            if job["status"] in ENDED:
                return job  # type: ignore[no-any-return]
            time.sleep(1.0)
            job = _call(client, "GET", f"/v1/batches/{job_id}")


def _download(client: Any, job: dict[str, Any], out: Path | None, errs: Path | None) -> None:
    for file_id, path, what in (
        (job["output_file_id"], out or Path(f"{job['id']}_output.jsonl"), "output"),
        (job["error_file_id"], errs or Path(f"{job['id']}_errors.jsonl"), "errors"),
    ):
        if file_id is None:
            continue
        with client.stream("GET", f"/v1/files/{file_id}/content") as r:
            if r.status_code != 200:
                raise Refused(f"GET {what} file {file_id}: {r.status_code}")
            with path.open("wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        print(f"{what}: {path}")


def run(args: Any) -> int:
    try:
        with _client(args) as client:
            return _run(args, client)
    except Refused as e:
        print(f"servery jobs: {e}", file=sys.stderr)
        return 2


def _run(args: Any, client: Any) -> int:
    cmd = args.jobs_command
    if cmd == "submit":
        with args.file.open("rb") as f:
            uploaded = _call(
                client,
                "POST",
                "/v1/files",
                files={"file": (args.file.name, f, "application/jsonl")},
                data={"purpose": "batch"},
            )
        body = {
            "input_file_id": uploaded["id"],
            "endpoint": args.endpoint,
            "completion_window": args.window,
        }
        job = _call(client, "POST", "/v1/batches", json=body)
        print(_line(job))
        if job["status"] == "failed":
            print(json.dumps(job["errors"], indent=2), file=sys.stderr)
            return 1
        if not args.wait:
            return 0
        job = _follow(client, job["id"], args.no_progress)
        print(_line(job))
        if args.output:
            _download(client, job, args.output, None)
        return 0 if job["status"] == "completed" else 1
    if cmd == "status":
        job = _call(client, "GET", f"/v1/batches/{args.id}")
        if args.wait:
            job = _follow(client, args.id, args.no_progress)
        print(_line(job))
        return 0 if job["status"] not in ENDED or job["status"] == "completed" else 1
    if cmd == "list":
        page = _call(client, "GET", "/v1/batches", params={"limit": args.limit})
        if args.json:  # the Batch API's own objects, as GET /v1/batches lists them
            print(json.dumps(page["data"], indent=2))
            return 0
        for job in page["data"]:
            print(_line(job))
        return 0
    if cmd == "cancel":
        print(_line(_call(client, "POST", f"/v1/batches/{args.id}/cancel")))
        return 0
    job = _call(client, "GET", f"/v1/batches/{args.id}")  # download
    if job["status"] not in ENDED:
        raise Refused(f"job {args.id} is {job['status']}: its files come when it ends")
    _download(client, job, args.output, args.errors)
    return 0
