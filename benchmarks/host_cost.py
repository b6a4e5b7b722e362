"""What the host itself spends on the AWS path: CPU per task, invoke rate, latency, memory.

The AWS backend runs against a moto server plus lambdafutures' Lambda endpoints, all in a
separate stack process that this script starts, so that the CPU moto, the endpoints and
their workers spend is not counted as the host's. Each measurement runs in a fresh host
process of its own (this script with --phase) that reports its figures; host CPU is read
from each host thread's own CPU clock and from getrusage.

The stack's endpoints: "run" runs tasks in real worker processes; "batch" runs them through
the real handler in the stack process and sends their completions ten to a SendMessageBatch
(as when many sandboxes finish together: real workers on this machine send ~100 messages/s,
one per call); "accept" and "slow" (--latency-ms per invoke) accept invokes and run nothing;
"front" forwards to moto over keep-alive connections, and the host reaches S3 and SQS
through it (moto closes every connection after one request, which AWS does not; see
--direct-moto).

    invoke_cpu        --invokes async invokes from --invoke-threads threads straight through
                      the backend's invoker ("accept"): process CPU per invoke for plain
                      boto3 and for the lean invoker, and their ratio in invokes per CPU
                      second.
    host_cpu          LambdaExecutor(backend="aws") running --tasks tiny tasks ("batch"),
                      with lean and with boto3 requests: host CPU per task, split into submit
                      (the caller's submit() calls plus the invoker threads) and completion
                      (SQS receiver and deleter threads plus the completion thread).
    host_cpu_workers  the same with --worker-tasks tasks on real worker processes ("run"):
                      completions trickle in, one per receive.
    latency           tasks submitted at a steady --latency-rate for --latency-s ("run"):
                      p50/p99 of the time from a worker's send of its completion (stats
                      sent_at) to the host's future being done (result_received).
    invoke_rate       --rate-invokes tasks into "slow": invokes/s from the first submit to
                      the last invoke the endpoint accepted, with boto3 and lean invokes.
    inflight          --inflight tasks invoked and never completed ("accept"): the host
                      process's RSS, in total and above its baseline before the first submit
                      (extrapolated to 100,000 futures when fewer are asked for).
    s3_results        (only with --s3-tasks N) tasks whose 300 KB results travel through S3:
                      host completion CPU per task including the S3 gets.

One JSON line on stdout, a short table on stderr. A default run takes about a minute; the
issue's full sizes are `--inflight 100000`.

    python benchmarks/host_cost.py [--phases invoke_cpu,host_cpu,...] [--invoker lean]
        [--invokes 2000] [--invoke-threads 8] [--tasks 1000] [--worker-tasks 300]
        [--latency-rate 50] [--latency-s 4] [--rate-invokes 2000] [--latency-ms 30]
        [--inflight 10000] [--s3-tasks 0] [--endpoint-workers 2] [--direct-moto]
"""

import argparse
import inspect
import json
import operator
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import wait

PHASES = ("invoke_cpu", "host_cpu", "host_cpu_workers", "latency", "invoke_rate", "inflight",
          "s3_results")
TARGETS = {
    "host_cpu_ms_per_task": 0.3,        # at most
    "invokes_per_s_at_latency": 1000,   # at least
    "completion_p50_ms": 20,            # at most
    "inflight_rss_mb": 300,             # at most
    "lean_vs_boto3_invokes_per_cpu_s": 3.0,  # at least
}
FUNCTION = "lf-host-cost"
BUCKET = "lf-host-cost"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# -- the stack process: moto, three Lambda endpoints, a counter of accepted invokes --------------

def serve(args):
    """Run moto and the endpoints until stdin closes; print their addresses as one line."""
    import io
    import logging
    import zipfile
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import boto3

    from lambdafutures.testing.lambda_endpoint import LambdaEndpoint
    from lambdafutures.testing.stack import start_moto

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request lines
    # 64 invoker threads connect at once; the default listen backlog of 5 resets some.
    ThreadingHTTPServer.request_queue_size = 1024
    report = ThreadingHTTPServer.handle_error

    def handle_error(server, request, client_address):
        # A phase process exits with long polls and invokes outstanding: not worth a trace.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            report(server, request, client_address)

    ThreadingHTTPServer.handle_error = handle_error
    moto, moto_url = start_moto()

    def client(service):
        return boto3.client(service, endpoint_url=moto_url)

    client("s3").create_bucket(Bucket=BUCKET)
    sqs = client("sqs")
    failure_queue = sqs.create_queue(QueueName="lf-host-cost-failures")["QueueUrl"]
    failure_arn = sqs.get_queue_attributes(QueueUrl=failure_queue, AttributeNames=["QueueArn"])
    role = client("iam").create_role(RoleName="lf-host-cost", AssumeRolePolicyDocument="{}")
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("placeholder.py", "")  # the endpoint runs the installed handler
    lam = client("lambda")
    lam.create_function(FunctionName=FUNCTION, Runtime="python3.11", Role=role["Role"]["Arn"],
                        Handler="lambdafutures_handler.worker.handle", Timeout=60,
                        Code={"ZipFile": code.getvalue()})
    lam.put_function_event_invoke_config(
        FunctionName=FUNCTION, MaximumRetryAttempts=0,
        DestinationConfig={"OnFailure": {
            "Destination": failure_arn["Attributes"]["QueueArn"]}})
    os.environ["AWS_ENDPOINT_URL"] = moto_url  # for the batch endpoint's in-process handler
    endpoints = {
        "run": LambdaEndpoint(moto_url, concurrency=args.endpoint_workers),
        "batch": batching_endpoint(LambdaEndpoint, moto_url, sqs),
        "accept": LambdaEndpoint(moto_url, run=False),
        "slow": LambdaEndpoint(moto_url, run=False, latency_s=args.latency_ms / 1000),
        # moto (Werkzeug) closes every connection after one request, which AWS does not do:
        # the host reaches S3 and SQS through this endpoint's keep-alive forwarding instead.
        "front": LambdaEndpoint(moto_url, run=False),
    }
    urls = {name: endpoint.start() for name, endpoint in endpoints.items()}

    class Counter(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({name: e.accepted for name, e in endpoints.items()}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    counter = ThreadingHTTPServer(("127.0.0.1", 0), Counter)
    threading.Thread(target=counter.serve_forever, daemon=True).start()
    print(json.dumps({"moto": moto_url, "endpoints": urls, "failure_queue_url": failure_queue,
                      "counter": "http://127.0.0.1:%d/" % counter.server_address[1]}),
          flush=True)
    sys.stdin.read()
    counter.shutdown()
    for endpoint in endpoints.values():
        endpoint.stop()
    moto.stop()


def batching_endpoint(endpoint_class, moto_url, sqs):
    """An endpoint that runs each accepted event through the real handler in this process and
    sends the completions ten to a SendMessageBatch: they arrive in bursts, as they do when
    many sandboxes finish together, which is the regime where host CPU per task matters.
    (Real worker processes here send one message each at the rate moto allows, ~100/s.)"""
    import queue

    from lambdafutures_handler import protocol, worker

    replies = []
    # This process only: the handler hands its completion over instead of sending it.
    worker.send_reply = lambda url, message: replies.append((url, message))

    def resign(message):
        # Protocol v3 signs the whole completion, stats included: sign it again after
        # sent_at changed, with the key this sandbox read for the message's executor.
        current = getattr(worker, "_current_key", None)
        if hasattr(protocol, "sign_completion") and current and current[0] == message.get(
                "executor"):
            protocol.sign_completion(current[1], message)

    class Batching(endpoint_class):
        def __init__(self):
            super().__init__(moto_url, run=False)
            self.events = queue.SimpleQueue()
            threading.Thread(target=self._reply_loop, name="batch-replier", daemon=True).start()

        def _invoke(self, request, name, body):
            super()._invoke(request, name, body)
            self.events.put(json.loads(body))

        def _reply_loop(self):
            while True:
                batch = [self.events.get()]
                deadline = time.monotonic() + 0.02
                while len(batch) < 10 and (left := deadline - time.monotonic()) > 0:
                    try:
                        batch.append(self.events.get(timeout=left))
                    except queue.Empty:
                        break
                for event in batch:
                    worker.handle(event)
                sent, replies[:] = list(replies), []
                now = time.time()
                for url in {url for url, _ in sent}:
                    messages = [message for to, message in sent if to == url]
                    for message in messages:
                        message["stats"]["sent_at"] = now  # sent now, not when handled
                        resign(message)
                    sqs.send_message_batch(QueueUrl=url, Entries=[
                        {"Id": str(n), "MessageBody": json.dumps(message)}
                        for n, message in enumerate(messages)])

    return Batching()


# -- host-side helpers --------------------------------------------------------------------------

def accepted(stack, name):
    with urllib.request.urlopen(stack["counter"], timeout=10) as response:
        return json.load(response)[name]


def wait_accepted(stack, name, count, timeout_s):
    """Poll the endpoint's counter until it reaches `count`; the time it did (or None)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if accepted(stack, name) >= count:
            return time.perf_counter()
        time.sleep(0.02)
    return None


def process_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu():
    """CPU seconds of each live thread, by name, from the threads' own CPU clocks."""
    clocks = {}
    for thread in threading.enumerate():
        try:
            clocks[thread.name] = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, TypeError):
            pass  # the thread ended meanwhile
    return clocks


COMPLETION_THREADS = ("lambdafutures-completion", "lambdafutures-receiver",
                      "lambdafutures-failure-receiver", "lambdafutures-acker")


def split_cpu(before, after):
    """CPU seconds spent between two thread_cpu() samples, summed by role."""
    roles = {"invokers": 0.0, "completion_thread": 0.0, "result_readers": 0.0,
             "sqs_receivers": 0.0, "sqs_deleter": 0.0, "other": 0.0}
    for name, end in after.items():
        spent = end - before.get(name, 0.0)
        if name.startswith("lambdafutures-invoker"):
            roles["invokers"] += spent
        elif name == "lambdafutures-completion":
            roles["completion_thread"] += spent
        elif name.startswith("lambdafutures-reader"):
            roles["result_readers"] += spent  # stored results' reads and deletes (v3)
        elif name == "lambdafutures-acker":
            roles["sqs_deleter"] += spent
        elif name.startswith(COMPLETION_THREADS):
            roles["sqs_receivers"] += spent
        elif name != "MainThread":
            roles["other"] += spent
    return roles


def rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(values):
    if not values:
        return {"p50": None, "p99": None, "count": 0}
    values = sorted(values)

    def at(q):
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"p50": at(0.50), "p99": at(0.99), "mean": statistics.fmean(values),
            "count": len(values)}


class SqsCalls:
    """Counts the executor's SQS receives and deletes: boto3's through its public event
    hooks, the lean client's by wrapping its two methods (in this process only)."""

    def __init__(self, session):
        from lambdafutures.backends.aws.lean import LeanSqsClient

        self.receives = self.received = self.deletes = self.deleted = 0
        session.events.register("after-call.sqs.ReceiveMessage",
                                lambda parsed, **_: self._received(parsed))
        session.events.register("after-call.sqs.DeleteMessageBatch",
                                lambda parsed, **_: self._deleted(parsed))
        receive, delete = LeanSqsClient.receive_message, LeanSqsClient.delete_message_batch
        LeanSqsClient.receive_message = lambda client, **kw: self._received(receive(client, **kw))
        LeanSqsClient.delete_message_batch = (
            lambda client, **kw: self._deleted(delete(client, **kw)))

    def _received(self, parsed):
        self.receives += 1
        self.received += len(parsed.get("Messages", ()))
        return parsed

    def _deleted(self, parsed):
        self.deletes += 1
        self.deleted += len(parsed.get("Successful", ()))
        return parsed

    def snapshot(self):
        return (self.receives, self.received, self.deletes, self.deleted)


def make_executor(stack, endpoint, invoker, max_workers, **extra):
    from lambdafutures import LambdaExecutor

    storage = stack["moto"] if stack.get("direct_moto") else stack["endpoints"]["front"]
    return LambdaExecutor(
        max_workers=max_workers, backend="aws", timeout=60, invoker=invoker, receiver=invoker,
        function_name=FUNCTION, bucket=BUCKET, queue_prefix="lf-host-cost-",
        failure_queue_url=stack["failure_queue_url"],
        endpoint_urls={"s3": storage, "sqs": storage,
                       "lambda": stack["endpoints"][endpoint]}, **extra)


# -- phases, each in its own host process -------------------------------------------------------

def phase_invoke_cpu(args, stack):
    import boto3
    from botocore.config import Config

    from lambdafutures.backends.aws.lean import make_invoker
    from lambdafutures_handler import protocol

    threads, count = args.invoke_threads, args.invokes
    session = boto3.Session()
    # The same client the aws backend builds for invokes.
    client = session.client("lambda", endpoint_url=stack["endpoints"]["accept"],
                            config=Config(max_pool_connections=threads,
                                          retries={"total_max_attempts": 1}))
    invoker = make_invoker(args.impl, client, session, FUNCTION, threads)
    data = b"x" * 120
    payload = protocol.inline_blob(data)
    # Protocol v3 signs the whole event (in make_event) with a key that stays out of it, the
    # payload travelling with its hash; v2 put the key and the payload's signature in it.
    version_fields = ({"payload_sha256": protocol.digest(data), "expires_at": None}
                      if "payload_sha256" in inspect.signature(protocol.make_event).parameters
                      else {"sig": "s" * 64})
    key = protocol.new_key()
    events = [protocol.make_event(
        executor="0123456789abcdef", task=n, attempt=0, payload=payload,
        store=f"s3://{BUCKET}/tasks", reply=f"{stack['moto']}/123456789012/q",
        key=key, timeout=60, submitted_at=time.time(),
        limit=protocol.inline_limit(), **version_fields) for n in range(count)]

    def run(share):
        for event in share:
            invoker.invoke(event)

    run(events[:threads * 4])  # warm: connections, credentials, code paths
    shares = [events[n::threads] for n in range(threads)]
    workers = [threading.Thread(target=run, args=(share,)) for share in shares]
    cpu, start = process_cpu(), time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall, cpu = time.perf_counter() - start, process_cpu() - cpu
    return {"invoker": type(invoker).__name__, "invokes": count, "threads": threads,
            "cpu_ms_per_invoke": cpu / count * 1e3, "invokes_per_cpu_s": count / cpu,
            "invokes_per_s": count / wall}


def phase_host_cpu(args, stack, endpoint, count=None, result_bytes=0):
    count = count or args.tasks
    import boto3

    session = boto3.Session()
    calls = SqsCalls(session)
    executor = make_executor(stack, endpoint, args.impl, args.max_workers, session=session)
    fn = operator.add if not result_bytes else os.urandom
    arguments = (lambda i: (i, 1)) if not result_bytes else (lambda i: (result_bytes,))
    # Warm up: worker sandboxes, pooled connections, code paths.
    wait([executor.submit(fn, *arguments(i)) for i in range(args.endpoint_workers * 4)])
    time.sleep(0.2)
    threads0, cpu0, calls0 = thread_cpu(), process_cpu(), calls.snapshot()
    main0 = time.thread_time()
    futures = [executor.submit(fn, *arguments(i)) for i in range(count)]
    submit_main = time.thread_time() - main0
    start = time.perf_counter()
    done, not_done = wait(futures, timeout=args.phase_timeout)
    wall = time.perf_counter() - start
    time.sleep(0.1)  # let the deleter finish the last batch: its CPU belongs to these tasks
    roles = split_cpu(threads0, thread_cpu())
    process = process_cpu() - cpu0
    receives, received, deletes, deleted = (b - a for a, b in zip(calls0, calls.snapshot(),
                                                                   strict=True))
    from lambdafutures import stats_of

    latencies = [(s.result_received - s.sent_at) * 1e3 for s in map(stats_of, done)
                 if s is not None and s.sent_at is not None]
    errors = sum(1 for f in done if f.exception() is not None)
    executor.shutdown(wait=True, cancel_futures=True)
    submit = submit_main + roles["invokers"]
    completion = (roles["completion_thread"] + roles["result_readers"] + roles["sqs_receivers"]
                  + roles["sqs_deleter"])
    ms = 1e3 / count
    return {
        "invoker": args.impl, "endpoint": endpoint, "tasks": count, "done": len(done),
        "errors": errors, "result_bytes": result_bytes, "tasks_per_s": len(done) / wall,
        "submit_ms_per_task": submit * ms,
        "completion_ms_per_task": completion * ms,
        "total_ms_per_task": (submit + completion) * ms,
        "process_ms_per_task": process * ms,
        "breakdown_ms_per_task": {
            "submit_calls": submit_main * ms, "invoker_threads": roles["invokers"] * ms,
            "completion_thread": roles["completion_thread"] * ms,
            "result_reader_threads": roles["result_readers"] * ms,
            "sqs_receiver_threads": roles["sqs_receivers"] * ms,
            "sqs_deleter_thread": roles["sqs_deleter"] * ms,
            "other_threads": roles["other"] * ms},
        "sqs_receive_calls": receives, "messages_per_receive": received / max(receives, 1),
        "sqs_delete_calls": deletes, "messages_per_delete": deleted / max(deletes, 1),
        "latency_ms_under_load": percentiles(latencies),
        "unfinished": len(not_done),
    }


def phase_latency(args, stack):
    executor = make_executor(stack, "run", args.impl, args.max_workers)
    wait([executor.submit(operator.add, i, 1) for i in range(args.endpoint_workers * 4)])
    count = max(1, int(args.latency_rate * args.latency_s))
    futures, start = [], time.perf_counter()
    for i in range(count):
        delay = start + i / args.latency_rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(executor.submit(operator.add, i, 1))
    done, _ = wait(futures, timeout=args.phase_timeout)
    from lambdafutures import stats_of

    latencies = [(s.result_received - s.sent_at) * 1e3 for s in map(stats_of, done)
                 if s is not None and s.sent_at is not None]
    executor.shutdown(wait=True, cancel_futures=True)
    return {"invoker": args.impl, "rate_per_s": args.latency_rate, "tasks": count,
            "completion_latency_ms": percentiles(latencies)}


def phase_invoke_rate(args, stack):
    count = args.rate_invokes
    executor = make_executor(stack, "slow", args.impl, count)
    base = accepted(stack, "slow")
    cpu, start = process_cpu(), time.perf_counter()
    for i in range(count):
        executor.submit(operator.add, i, 1)
    finished = wait_accepted(stack, "slow", base + count, args.phase_timeout)
    cpu = process_cpu() - cpu
    got = accepted(stack, "slow") - base
    # These futures never complete (nothing runs them): the process ends without waiting.
    executor.shutdown(wait=False, cancel_futures=True)
    return {"invoker": args.impl, "invokes": count, "accepted": got,
            "latency_ms": args.latency_ms, "invoke_threads": invoke_threads(executor),
            "invokes_per_s": got / ((finished or time.perf_counter()) - start),
            "host_cpu_ms_per_task": cpu / max(got, 1) * 1e3, "complete": finished is not None}


def invoke_threads(executor):
    """The executor's invoker thread count (private: where it lives differs by version)."""
    backend = getattr(executor, "_backend", None) or executor._scheduler.backend
    return backend.invoke_threads


def phase_inflight(args, stack):
    import gc

    count = args.inflight
    executor = make_executor(stack, "accept", args.impl, count)
    wait_accepted(stack, "accept", 0, 1)  # the counter's first call allocates too
    gc.collect()
    baseline = rss_mb()
    base = accepted(stack, "accept")
    start = time.perf_counter()
    futures = [executor.submit(operator.add, i, 1) for i in range(count)]
    finished = wait_accepted(stack, "accept", base + count, args.phase_timeout)
    elapsed = (finished or time.perf_counter()) - start
    gc.collect()
    total = rss_mb()
    got = accepted(stack, "accept") - base
    running = sum(1 for f in futures if f.running())
    executor.shutdown(wait=False, cancel_futures=True)
    return {"invoker": args.impl, "futures": count, "invoked": got, "running": running,
            "rss_mb": total, "baseline_rss_mb": baseline, "delta_mb": total - baseline,
            "bytes_per_future": (total - baseline) * 2**20 / count,
            "invokes_per_s": got / elapsed, "complete": finished is not None}


def run_phase(args):
    stack = json.loads(args.stack)
    os.environ.update(CREDENTIALS)
    if args.phase == "invoke_cpu":
        result = phase_invoke_cpu(args, stack)
    elif args.phase == "host_cpu":
        result = phase_host_cpu(args, stack, "batch")
    elif args.phase == "host_cpu_workers":
        result = phase_host_cpu(args, stack, "run", count=args.worker_tasks)
    elif args.phase == "s3_results":
        result = phase_host_cpu(args, stack, "batch", count=args.s3_tasks,
                                result_bytes=300 * 1024)
    elif args.phase == "latency":
        result = phase_latency(args, stack)
    elif args.phase == "invoke_rate":
        result = phase_invoke_rate(args, stack)
    else:
        result = phase_inflight(args, stack)
    print(json.dumps(result), flush=True)
    # Phases that leave futures in flight must not wait for them at exit (atexit would).
    os._exit(0)


# -- the orchestrating process ------------------------------------------------------------------

def start_stack(args):
    env = {**os.environ, **CREDENTIALS}
    for variable in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_LAMBDA", "AWS_PROFILE"):
        env.pop(variable, None)
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--latency-ms", str(args.latency_ms),
         "--endpoint-workers", str(args.endpoint_workers)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    if not line:
        raise RuntimeError("the stack process did not start")
    return process, json.loads(line)


def phase(args, stack, name, impl):
    command = [sys.executable, __file__, "--phase", name, "--impl", impl,
               "--stack", json.dumps(stack)]
    for flag in ("invokes", "invoke_threads", "tasks", "worker_tasks", "latency_rate", "latency_s",
                 "rate_invokes", "latency_ms", "inflight", "s3_tasks", "endpoint_workers",
                 "max_workers", "phase_timeout"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True,
                          timeout=args.phase_timeout + 60, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"phase {name} ({impl}) failed with exit code {done.returncode}")
    result = json.loads(lines[-1])
    result["phase_wall_s"] = time.perf_counter() - started
    print(f"  {name:12s} {impl:6s} done in {result['phase_wall_s']:.1f} s", file=sys.stderr)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default=",".join(PHASES[:-1]))
    parser.add_argument("--invoker", default="lean", choices=("lean", "boto3"),
                        help="lean or boto3 requests in host_cpu_workers, latency, inflight "
                             "(invoke_cpu, host_cpu and invoke_rate run both)")
    parser.add_argument("--invokes", type=int, default=2000, help="invoke_cpu: invokes")
    parser.add_argument("--invoke-threads", type=int, default=8, help="invoke_cpu: threads")
    parser.add_argument("--tasks", type=int, default=1000, help="host_cpu: tasks")
    parser.add_argument("--worker-tasks", type=int, default=300,
                        help="host_cpu_workers: tasks run by real worker processes")
    parser.add_argument("--max-workers", type=int, default=256,
                        help="host_cpu / latency: the executor's max_workers")
    parser.add_argument("--latency-rate", type=float, default=50.0,
                        help="latency: tasks submitted per second")
    parser.add_argument("--latency-s", type=float, default=4.0,
                        help="latency: seconds of paced submits")
    parser.add_argument("--rate-invokes", type=int, default=2000, help="invoke_rate: tasks")
    parser.add_argument("--latency-ms", type=float, default=30.0,
                        help="invoke_rate: the endpoint's artificial latency per invoke")
    parser.add_argument("--inflight", type=int, default=10000, help="inflight: futures")
    parser.add_argument("--s3-tasks", type=int, default=0,
                        help="s3_results: tasks with 300 KB results (0 skips the phase)")
    parser.add_argument("--endpoint-workers", type=int, default=os.cpu_count() or 2,
                        help="worker processes behind the endpoint that runs tasks")
    parser.add_argument("--phase-timeout", type=float, default=120.0)
    parser.add_argument("--direct-moto", action="store_true",
                        help="host to moto for S3 and SQS without the keep-alive front (moto "
                             "then opens a connection per request, which AWS does not)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="lean", help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        os.environ.update(CREDENTIALS)
        return serve(args)
    if args.phase:
        return run_phase(args)

    chosen = [name.strip() for name in args.phases.split(",") if name.strip()]
    if args.s3_tasks and "s3_results" not in chosen:
        chosen.append("s3_results")
    unknown = set(chosen) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    stack_process, stack = start_stack(args)
    stack["direct_moto"] = args.direct_moto
    results = {}
    try:
        if "invoke_cpu" in chosen:
            results["invoke_cpu"] = {impl: phase(args, stack, "invoke_cpu", impl)
                                     for impl in ("boto3", "lean")}
        if "host_cpu" in chosen:
            results["host_cpu"] = {impl: phase(args, stack, "host_cpu", impl)
                                   for impl in ("boto3", "lean")}
        if "host_cpu_workers" in chosen:
            results["host_cpu_workers"] = phase(args, stack, "host_cpu_workers", args.invoker)
        if "s3_results" in chosen and args.s3_tasks:
            results["s3_results"] = phase(args, stack, "s3_results", args.invoker)
        if "latency" in chosen:
            results["latency"] = phase(args, stack, "latency", args.invoker)
        if "invoke_rate" in chosen:
            results["invoke_rate"] = {impl: phase(args, stack, "invoke_rate", impl)
                                      for impl in ("boto3", "lean")}
        if "inflight" in chosen:
            results["inflight"] = phase(args, stack, "inflight", args.invoker)
    finally:
        stack_process.stdin.close()
        try:
            stack_process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stack_process.kill()

    found = targets(args, results)  # also adds the ratios to results
    record = {"benchmark": "host_cost", "invoker": args.invoker, "cpus": os.cpu_count(),
              "s3_sqs_via": "moto directly" if args.direct_moto else "keep-alive front to moto",
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0],
              "wall_s": time.perf_counter() - started, **results}
    record["targets"] = found
    print(json.dumps(record))
    table(args, results, found)
    return 0


def targets(args, results):
    found = {}

    def check(name, value, at_least=False):
        if value is None:
            return
        limit = TARGETS[name]
        found[name] = {"value": value, "target": limit,
                       "met": value >= limit if at_least else value <= limit}

    if "invoke_cpu" in results:
        boto, lean = results["invoke_cpu"]["boto3"], results["invoke_cpu"]["lean"]
        ratio = lean["invokes_per_cpu_s"] / boto["invokes_per_cpu_s"]
        results["invoke_cpu"]["lean_vs_boto3"] = ratio
        check("lean_vs_boto3_invokes_per_cpu_s", ratio, at_least=True)
    if "host_cpu" in results:
        totals = {impl: r["total_ms_per_task"] for impl, r in results["host_cpu"].items()}
        results["host_cpu_boto3_over_lean"] = totals["boto3"] / totals["lean"]
        check("host_cpu_ms_per_task", totals[args.invoker])
    if "invoke_rate" in results:
        check("invokes_per_s_at_latency", results["invoke_rate"][args.invoker]["invokes_per_s"],
              at_least=True)
    if "latency" in results:
        check("completion_p50_ms", results["latency"]["completion_latency_ms"]["p50"])
    if "inflight" in results:
        # The whole host process (interpreter, boto3, executor and all), not just the growth.
        scaled = results["inflight"]["rss_mb"]
        if results["inflight"]["futures"] < 100_000:
            scaled = (results["inflight"]["baseline_rss_mb"]
                      + results["inflight"]["delta_mb"] * 100_000 / results["inflight"]["futures"])
            results["inflight"]["rss_mb_at_100k_extrapolated"] = scaled
        check("inflight_rss_mb", scaled)
    return found


def table(args, results, found):
    def out(text=""):
        print(text, file=sys.stderr)

    out()
    if "invoke_cpu" in results:
        out(f"invoke CPU ({args.invokes} invokes, {args.invoke_threads} threads, "
            f"endpoint accepts without running)")
        for impl in ("boto3", "lean"):
            r = results["invoke_cpu"][impl]
            out(f"  {impl:6s} {r['cpu_ms_per_invoke']:7.3f} ms CPU/invoke  "
                f"{r['invokes_per_cpu_s']:8.0f} invokes/CPU-s  {r['invokes_per_s']:7.0f}/s")
        out(f"  lean / boto3 invokes per CPU second: {results['invoke_cpu']['lean_vs_boto3']:.2f}x")
    runs = [(f"completions arriving in batches, {impl}", r)
            for impl, r in results.get("host_cpu", {}).items()]
    if "host_cpu_workers" in results:
        runs.append((f"real worker processes, {args.invoker}", results["host_cpu_workers"]))
    for title, r in runs:
        out(f"host CPU per task, {title} ({r['tasks']} tasks, {r['tasks_per_s']:.0f} tasks/s)")
        out(f"  submit {r['submit_ms_per_task']:.3f} ms + completion "
            f"{r['completion_ms_per_task']:.3f} ms = {r['total_ms_per_task']:.3f} ms "
            f"(whole process {r['process_ms_per_task']:.3f} ms)")
        for part, value in r["breakdown_ms_per_task"].items():
            out(f"    {part:28s} {value:.3f} ms")
        out(f"  SQS: {r['messages_per_receive']:.1f} messages per receive, "
            f"{r['messages_per_delete']:.1f} per delete batch")
        under = r["latency_ms_under_load"]
        if under["count"]:
            out(f"  completion latency under this load: p50 {under['p50']:.1f} ms, "
                f"p99 {under['p99']:.1f} ms")
    if "s3_results" in results:
        r = results["s3_results"]
        out(f"S3 results ({r['tasks']} x {r['result_bytes'] // 1024} KB): completion "
            f"{r['completion_ms_per_task']:.3f} ms/task (thread "
            f"{r['breakdown_ms_per_task']['completion_thread']:.3f} ms)")
    if "latency" in results:
        r = results["latency"]
        lat = r["completion_latency_ms"]
        out(f"completion latency at {r['rate_per_s']:g} tasks/s ({lat['count']} tasks): "
            f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms")
    if "invoke_rate" in results:
        out(f"invokes/s with {args.latency_ms:g} ms endpoint latency ({args.rate_invokes} tasks)")
        for impl, r in results["invoke_rate"].items():
            out(f"  {impl:6s} {r['invokes_per_s']:7.0f}/s  ({r['invoke_threads']} threads, "
                f"{r['host_cpu_ms_per_task']:.3f} ms host CPU/task)")
    if "inflight" in results:
        r = results["inflight"]
        out(f"{r['futures']} futures in flight: RSS {r['rss_mb']:.0f} MB "
            f"(baseline {r['baseline_rss_mb']:.0f} MB, {r['bytes_per_future']:.0f} B/future)")
    out("targets:")
    for name, t in found.items():
        out(f"  {name:34s} {t['value']:10.3f}  target {t['target']:g}  "
            f"{'met' if t['met'] else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
