#!/usr/bin/env python3
"""A sked worker in Python: executes the runs of one queue's `worker` handler.

Stubs come from the repository's proto files (once):
    python -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen proto/sked/v1/*.proto
Run it with the stubs on the path:
    PYTHONPATH=gen python examples/python_worker.py QUEUE
Environment: SKED_ADDR (default 127.0.0.1:50051); SKED_TOKEN, a key with role worker (none in
the development mode); SKED_TENANT, the tenant to work for with a platform key (x-tenant-id);
SKED_MAX_RUNS, exit after that many runs (default: run forever).
"""
import os
import queue
import sys

import grpc
from sked.v1 import worker_service_pb2 as pb
from sked.v1 import worker_service_pb2_grpc as pb_grpc


def work(run):
    """Your code: the run's params in, a JSON-like result out."""
    params = dict(run.params)
    return {"greeting": f"hello {params.get('name', 'world')}", "attempt": run.attempt}


def main():
    metadata = [("authorization", f"Bearer {os.environ['SKED_TOKEN']}")] if os.environ.get("SKED_TOKEN") else []
    if os.environ.get("SKED_TENANT"):
        metadata.append(("x-tenant-id", os.environ["SKED_TENANT"]))
    max_runs = int(os.environ.get("SKED_MAX_RUNS", "0"))
    outbox = queue.Queue()  # what the worker sends on its stream
    hello = pb.Hello(queue=sys.argv[1] if len(sys.argv) > 1 else "default", worker_name="python", slots=4)
    outbox.put(pb.WorkerRequest(hello=hello))
    channel = grpc.insecure_channel(os.environ.get("SKED_ADDR", "127.0.0.1:50051"))
    stream = pb_grpc.WorkerServiceStub(channel).Work(iter(outbox.get, None), metadata=metadata)
    done = 0
    for msg in stream:
        if msg.HasField("assigned"):
            run = msg.assigned
            try:
                complete = pb.Complete(lease_token=run.lease_token)
                complete.result.update(work(run))
                outbox.put(pb.WorkerRequest(completes=[complete]))
            except Exception as e:  # a failure of your code: retried per the retry policy
                outbox.put(pb.WorkerRequest(fails=[pb.Fail(lease_token=run.lease_token, error=str(e)[:1000], retryable=True)]))
            print(f"run {run.run_id} attempt {run.attempt} done", flush=True)
        elif msg.HasField("cancel"):
            outbox.put(pb.WorkerRequest(cancel_acks=[pb.CancelAck(lease_token=msg.cancel.lease_token)]))
        elif msg.HasField("ack") and msg.ack.code == 0:
            done += 1
            if max_runs and done >= max_runs:
                outbox.put(None)  # close the stream
                break
        elif msg.HasField("ack"):
            print(f"lease {msg.ack.lease_token}: {msg.ack.message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
