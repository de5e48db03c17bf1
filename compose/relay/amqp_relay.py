"""The broker's AMQP port, and nothing else of it, on the tenants' networks
(issue #22; docs/operations.md, "Docker walls"). The orchestrator joins this
container to each tenant's network under the broker's host name (rabbitmq, or
rabbitmq1..3 in the cluster file), so an instance's STRATUS_AMQP_URL works
there while the broker's management API (15672) and metrics (15692) stay out
of its reach. Each connection is piped byte for byte to RELAY_UPSTREAM
(host:port on the stack's network: the stack network's name comes first when
the relay resolves it, so it is the broker itself, never this relay).
Standard library only; mounted read-only into the app base image."""
import asyncio
import os
import sys

LISTEN = int(os.environ.get("RELAY_PORT", "5672"))
UP_HOST, _, UP_PORT = os.environ.get("RELAY_UPSTREAM", "rabbitmq:5672").rpartition(":")


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except OSError:
            pass


async def handle(creader, cwriter):
    try:
        ureader, uwriter = await asyncio.wait_for(asyncio.open_connection(UP_HOST, int(UP_PORT)), 5)
    except (OSError, asyncio.TimeoutError) as exc:
        print(f"amqp-relay: upstream {UP_HOST}:{UP_PORT}: {exc!r}", file=sys.stderr, flush=True)
        cwriter.close()
        return
    await asyncio.gather(pipe(creader, uwriter), pipe(ureader, cwriter))


async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", LISTEN)
    print(f"amqp-relay: :{LISTEN} -> {UP_HOST}:{UP_PORT}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
