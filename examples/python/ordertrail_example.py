#!/usr/bin/env python3
"""A second, independent ordertrail client: Python with grpcio.

Generates the stubs from the repository's proto/ at start, posts the
documented OrderMesh examples to the webhook listener, looks the order up by
the merchant's reference, then tails the event stream from the beginning
until it is caught up.

    pip install -r requirements.txt
    python ordertrail_example.py --http 127.0.0.1:8080 --grpc 127.0.0.1:50051

With --check it verifies what it saw and exits non-zero on any mismatch (CI
runs it that way against a real server).
"""

import argparse
import importlib
import pathlib
import sys
import tempfile
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "ordermesh"
WEBHOOKS = ["order-creation", "order-update", "shipment-created", "shipment-update"]


def load_stubs():
    """Compiles proto/ordertrail/v1/*.proto into a temporary package."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="ordertrail-stubs-")
    protos = sorted(str(p) for p in (ROOT / "proto" / "ordertrail" / "v1").glob("*.proto"))
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    return (
        importlib.import_module("ordertrail.v1.service_pb2"),
        importlib.import_module("ordertrail.v1.service_pb2_grpc"),
        importlib.import_module("ordertrail.v1.model_pb2"),
    )


def post_webhooks(http):
    for name in WEBHOOKS:
        body = (FIXTURES / f"{name}.json").read_bytes()
        request = urllib.request.Request(
            f"http://{http}/webhooks/ordermesh", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            print(f"POST {name}: {response.status} {response.read().decode()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc", default="127.0.0.1:50051", help="gRPC listener")
    parser.add_argument("--http", help="webhook listener; when given, the OrderMesh examples are posted first")
    parser.add_argument("--check", action="store_true", help="verify the results and fail on a mismatch")
    args = parser.parse_args()

    import grpc

    service, service_grpc, model = load_stubs()
    if args.http:
        post_webhooks(args.http)

    channel = grpc.insecure_channel(args.grpc)
    client = service_grpc.OrderTrailStub(channel)
    order = client.GetOrder(service.GetOrderRequest(external_order_id="WBTEST22"), timeout=30)
    status = model.OrderStatus.Name(order.status)
    print(f"order {order.id} {order.references.merchant_reference}: {status}")
    for shipment in order.shipments:
        print(f"  shipment {shipment.id}: {model.ShipmentStatus.Name(shipment.status)} "
              f"{shipment.carrier} {shipment.tracking_number}")

    sequences, caught_up = [], None
    stream = client.Subscribe(service.SubscribeRequest(after_sequence=0), timeout=60)
    for response in stream:
        kind = response.WhichOneof("message")
        if kind == "event":
            event = response.event
            sequences.append(event.sequence)
            print(f"event {event.sequence} {model.EventKind.Name(event.kind)} order={event.order_id}")
        elif kind == "caught_up":
            caught_up = response.caught_up.sequence
            print(f"caught up at {caught_up}")
            stream.cancel()
            break

    if args.check:
        problems = []
        if status != "ORDER_STATUS_SHIPPED":
            problems.append(f"order status {status}, expected ORDER_STATUS_SHIPPED")
        if not order.shipments or order.shipments[0].tracking_number != "9400136208551280752547":
            problems.append("the shipment's tracking number is missing")
        if sequences != list(range(1, len(WEBHOOKS) + 1)):
            problems.append(f"stream sequences {sequences}, expected 1..{len(WEBHOOKS)}")
        if caught_up != len(WEBHOOKS):
            problems.append(f"caught_up at {caught_up}, expected {len(WEBHOOKS)}")
        try:
            client.GetOrder(service.GetOrderRequest(), timeout=30)
            problems.append("GetOrder without a reference succeeded")
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                problems.append(f"GetOrder without a reference: {error.code()}, expected INVALID_ARGUMENT")
        for problem in problems:
            print(f"FAIL: {problem}")
        print("python client: " + ("checks failed" if problems else "all checks passed"))
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
