# The soak's foreign producer (confluent-kafka): customer events at a fixed rate, with per-key
# sequence numbers in the payload, a known poison set, and the downstream outages of the fault
# schedule written into the events themselves (the reference handler's test hook).
#
#   python producer.py '<json config>'
#
# Config: brokers, topic, rate (records/s), seconds, seed, keys, poison_every, outages
# ([[start_s, end_s], ...] from the stream's start). The poison set: one record in poison_every,
# alternately undecodable and failing forever, and once per outage a record failing forever
# sent behind a key the outage parked (the retry worker must dead-letter that one). One JSON line per delivered record on
# stdout: n, id, key, seq, type, kind (ok | outage | undecodable | permanent), t (unix ms when
# produce() was called), p, o (partition and offset the broker acknowledged).
import datetime, json, random, sys, time, uuid
from confluent_kafka import Producer

config = json.loads(sys.argv[1])
rng = random.Random(config["seed"])
producer = Producer({
    "bootstrap.servers": config["brokers"],
    # One record per batch (Tansu skips the rest of a batch when a fetch starts inside it), and
    # one request in flight, so a retried send cannot overtake the next one of its key.
    "linger.ms": 0,
    "batch.num.messages": 1,
    "max.in.flight.requests.per.connection": 1,
    "message.timeout.ms": 300000,
})
errors = []
TYPES = ["customer.created", "customer.updated", "customer.updated", "customer.deleted"]


def report(err, msg, line):
    if err is not None:
        errors.append(f"{line['n']}: {err}")
        return
    line["p"] = msg.partition()
    line["o"] = msg.offset()
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def iso(unix):
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).isoformat()


start = time.time()
total = int(config["rate"] * config["seconds"])
seqs = {}
# Chains (key, type) sent with an outage, and when: a poison record sent behind one of them is
# parked behind it, so it is the retry worker that must dead-letter it.
outage_chains = []
behind_sent = set()
for n in range(total):
    due = start + n / config["rate"]
    while True:
        left = due - time.time()
        if left <= 0:
            break
        producer.poll(min(left, 0.05))
    elapsed = time.time() - start
    outage = None
    for i, (begin, end) in enumerate(config["outages"]):
        if begin <= elapsed < end:
            outage = (i, end)
    every = config["poison_every"]
    poison = None
    if every and n % every == every // 2:
        poison = "undecodable" if (n // every) % 2 == 0 else "permanent"
    key = f"c-{rng.randrange(config['keys'])}"
    event_type = rng.choice(TYPES)
    if outage is not None and outage[0] not in behind_sent and poison is None:
        eligible = [c for c in outage_chains if elapsed - c[0] >= 5.0]
        if eligible:
            # Once per outage: a record failing for good, behind a key parked by the outage.
            poison = "permanent"
            behind_sent.add(outage[0])
    if poison == "permanent" and outage is not None:
        eligible = [c for c in outage_chains if elapsed - c[0] >= 1.0]
        if eligible:
            _, key, event_type = rng.choice(eligible)
    seq = seqs.get(key, 0) + 1
    seqs[key] = seq
    event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"weir-soak/{config['seed']}/{n}"))
    details = {"seq": seq, "n": n}
    kind = "ok"
    if outage is not None:
        kind = "outage"
        details = {"seq": seq, "n": n, "simulate": "outage", "until": iso(start + outage[1])}
    if poison == "undecodable":
        kind = "undecodable"
        value = b"\xff\xfe not a CloudEvent " + str(n).encode()
    else:
        if poison == "permanent":
            kind = "permanent"
            details = {"seq": seq, "n": n, "simulate": "permanent"}
        elif kind == "outage":
            outage_chains.append((elapsed, key, event_type))
        value = json.dumps({
            "specversion": "1.0", "id": event_id, "type": event_type,
            "source": "/soak-producer", "time": iso(time.time()), "subject": key,
            "datacontenttype": "application/json",
            "data": {"customer_id": key, "details": details},
        }).encode()
    line = {"n": n, "id": event_id, "key": key, "seq": seq, "type": event_type, "kind": kind,
            "t": int(time.time() * 1000)}
    producer.produce(config["topic"], key=key.encode(), value=value,
                     headers=[("content-type", b"application/cloudevents+json")],
                     on_delivery=lambda err, msg, line=line: report(err, msg, line))
    producer.poll(0)

left = producer.flush(300)
if left or errors:
    sys.exit(f"not delivered: {left} left, errors {errors[:20]}")
