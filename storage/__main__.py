"""`python -m storage`: run a service, a whole local cluster, or a client command.

  python -m storage mgmtd --port P --data-dir D [--lease-s 10]
  python -m storage meta  --mgmtd HOST:P [--port P2] [--kv sqlite:PATH|etcd://HOST:PORT|memory]
  python -m storage node  --mgmtd HOST:P --data-dir D [--targets N] [--port P3]
  python -m storage cluster --nodes 3 --replicas 3 --data-dir DIR [--port P]
  python -m storage ls|stat|mkdir|rm PATH --address HOST:P
  python -m storage put LOCAL REMOTE --address HOST:P;  python -m storage get REMOTE LOCAL --address HOST:P

Each service prints "<name> ready at HOST:PORT" once it serves and stops cleanly on SIGINT or
SIGTERM. `cluster` runs every service as its own child process, as 3FS deploys them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from storage.transport import RpcClient, RpcServer, new_event_loop


def _serve_until_signalled(start, stop) -> None:
  loop = new_event_loop()
  asyncio.set_event_loop(loop)
  stopping = asyncio.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, stopping.set)

  async def main():
    await start()
    await stopping.wait()
    await stop()

  loop.run_until_complete(main())
  loop.close()


def run_mgmtd(args) -> None:
  from storage.cluster.mgmtd import Mgmtd
  mgmtd = Mgmtd(args.data_dir, lease_s=args.lease_s)
  server = RpcServer(mgmtd.handlers, args.host, args.port)
  tasks = []

  async def start():
    await server.start()
    tasks.append(asyncio.create_task(mgmtd.run_scanner()))
    print(f"mgmtd ready at {server.address}", flush=True)

  async def stop():
    tasks[0].cancel()
    await server.stop()
    mgmtd.close()

  _serve_until_signalled(start, stop)


def _kv(spec: str):
  from storage.kv import open_kv
  try:
    return open_kv(spec)
  except ValueError as err:
    raise SystemExit(f"--kv: {err}") from None


def run_meta(args) -> None:
  from storage.meta.service import MetaServer
  if args.kv == "memory":
    print("meta: --kv memory keeps the namespace in this process only; it is lost when the process ends "
          "(use sqlite:PATH or etcd://HOST:PORT to keep it)", file=sys.stderr, flush=True)
  server = MetaServer(_kv(args.kv), args.mgmtd, host=args.host, port=args.port, chunk_size=args.chunk_size,
                      stripe=args.stripe, gc_delay_s=args.gc_delay_s)

  async def start():
    await server.start()
    print(f"meta ready at {server.address}", flush=True)

  _serve_until_signalled(start, server.stop)


def run_node(args) -> None:
  from storage.node import StorageNode
  node = StorageNode(args.data_dir, args.mgmtd, num_targets=args.targets, host=args.host, port=args.port)

  async def start():
    await node.start()
    print(f"node ready at {node.address}", flush=True)

  _serve_until_signalled(start, node.stop)


def _spawn(argv: list[str], name: str, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
  """Starts `python -m storage ...` and waits for its ready line; returns the process and its address."""
  proc = subprocess.Popen([sys.executable, "-m", "storage", *argv], stdout=subprocess.PIPE, text=True)
  deadline = time.monotonic() + timeout_s
  line = proc.stdout.readline()
  if f"{name} ready at" not in line or time.monotonic() > deadline:
    proc.kill()
    raise SystemExit(f"{name} did not start: {line!r}")
  return proc, line.strip().rsplit(" ", 1)[-1]


def run_cluster(args) -> None:
  root = pathlib.Path(args.data_dir)
  root.mkdir(parents=True, exist_ok=True)
  children: list[subprocess.Popen] = []
  try:
    mgmtd, address = _spawn(["mgmtd", "--port", str(args.port), "--data-dir", str(root / "mgmtd"),
                             "--lease-s", str(args.lease_s)], "mgmtd")
    children.append(mgmtd)
    for i in range(args.nodes):
      node, _ = _spawn(["node", "--mgmtd", address, "--data-dir", str(root / f"node{i}"), "--targets",
                        str(args.targets)], "node")
      children.append(node)

    async def chain_table():
      client = RpcClient(address)
      chains = await client.call("create_chain_table", replicas=args.replicas)
      await client.close()
      return chains
    loop = new_event_loop()
    loop.run_until_complete(chain_table())
    loop.close()
    meta, _ = _spawn(["meta", "--mgmtd", address, "--kv", f"sqlite:{root / 'meta.db'}",
                      "--chunk-size", str(args.chunk_size), "--gc-delay-s", str(args.gc_delay_s)], "meta")
    children.append(meta)
    print(f"storage cluster ready at {address}", flush=True)
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, lambda *_: stop.update(now=True))
    while not stop["now"] and all(child.poll() is None for child in children):
      time.sleep(0.2)
  finally:
    for child in reversed(children):
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    for child in reversed(children):
      try:
        child.wait(timeout=10)
      except subprocess.TimeoutExpired:
        child.kill()


def run_client(args) -> None:
  import storage
  with storage.connect(args.address) as client:
    if args.command == "ls":
      for name in client.listdir(args.path):
        print(name)
    elif args.command == "stat":
      stat = client.stat(args.path)
      print(f"{'dir' if stat.is_dir else 'file'} size={stat.size} inode={stat.inode} chains={stat.chains}")
    elif args.command == "mkdir":
      client.mkdir(args.path, parents=True, exist_ok=True)
    elif args.command == "rm":
      if client.stat(args.path).is_dir:
        client.rmdir(args.path)
      else:
        client.remove(args.path)
    elif args.command == "put":
      with open(args.local, "rb") as src, client.open(args.remote, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    elif args.command == "get":
      with client.open(args.remote, "rb") as src, open(args.local, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m storage", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("mgmtd")
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--data-dir", required=True)
  p.add_argument("--lease-s", type=float, default=10.0)
  p.set_defaults(run=run_mgmtd)
  p = sub.add_parser("meta")
  p.add_argument("--mgmtd", required=True)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--kv", default="memory")
  p.add_argument("--chunk-size", type=int, default=1 << 20)
  p.add_argument("--stripe", type=int, default=16)
  p.add_argument("--gc-delay-s", type=float, default=30.0,
                 help="seconds a removed file stays readable for readers that opened it before")
  p.set_defaults(run=run_meta)
  p = sub.add_parser("node")
  p.add_argument("--mgmtd", required=True)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--data-dir", required=True)
  p.add_argument("--targets", type=int, default=1)
  p.set_defaults(run=run_node)
  p = sub.add_parser("cluster")
  p.add_argument("--nodes", type=int, default=3)
  p.add_argument("--replicas", type=int, default=3)
  p.add_argument("--targets", type=int, default=1)
  p.add_argument("--data-dir", required=True)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--lease-s", type=float, default=10.0)
  p.add_argument("--chunk-size", type=int, default=1 << 20)
  p.add_argument("--gc-delay-s", type=float, default=30.0)
  p.set_defaults(run=run_cluster)
  for name, positional in (("ls", ["path"]), ("stat", ["path"]), ("mkdir", ["path"]), ("rm", ["path"]),
                           ("put", ["local", "remote"]), ("get", ["remote", "local"])):
    p = sub.add_parser(name)
    for arg in positional:
      p.add_argument(arg)
    p.add_argument("--address", required=True, help="the mgmtd address, HOST:PORT")
    p.set_defaults(run=run_client)
  args = parser.parse_args(argv)
  if args.command in ("mgmtd", "meta", "node", "cluster") and getattr(args, "port", 0) < 0:
    parser.error("--port must be >= 0")
  args.run(args)


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  main()
