#!/usr/bin/env python3
"""Writes the committed fuzz seeds (fuzz/seeds/<target>/) in the layouts the
targets read (see each target's module docs). Run from anywhere:
python3 fuzz/seeds/generate.py. The config seeds are the files in config/."""

import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# --- protobuf, just enough for Sparkplug B payloads ------------------------

def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, wire, value):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(value)
    if wire == 1:
        return key + value
    if wire == 5:
        return key + value
    return key + varint(len(value)) + value  # wire 2


def metric(name=None, alias=None, datatype=None, ts=None, int_value=None,
           long_value=None, double=None, boolean=None, string=None,
           is_null=None, template=None, dataset=None):
    m = b""
    if name is not None:
        m += field(1, 2, name.encode())
    if alias is not None:
        m += field(2, 0, alias)
    if ts is not None:
        m += field(3, 0, ts)
    if datatype is not None:
        m += field(4, 0, datatype)
    if is_null is not None:
        m += field(7, 0, int(is_null))
    if int_value is not None:
        m += field(10, 0, int_value)
    if long_value is not None:
        m += field(11, 0, long_value)
    if double is not None:
        m += field(13, 1, struct.pack("<d", double))
    if boolean is not None:
        m += field(14, 0, int(boolean))
    if string is not None:
        m += field(15, 2, string.encode())
    if dataset is not None:
        m += field(17, 2, dataset)
    if template is not None:
        m += field(18, 2, template)
    return m


def payload(ts=None, seq=None, metrics=()):
    p = b""
    if ts is not None:
        p += field(1, 0, ts)
    for m in metrics:
        p += field(2, 2, m)
    if seq is not None:
        p += field(3, 0, seq)
    return p


TS = 1_796_000_000_000
NBIRTH = payload(TS, 0, [
    metric("bdSeq", datatype=8, long_value=0),
    metric("Node Control/Rebirth", alias=1, datatype=11, boolean=False),
    metric("Press/State", alias=2, datatype=12, string="running"),
    metric("Press/Temperature", alias=3, datatype=10, double=71.5),
    metric("Press/Count", alias=4, datatype=3, int_value=0xFFFFFFFE),
])
NDATA = payload(TS + 1000, 1, [
    metric(alias=2, string="stopped"),
    metric(alias=3, double=72.25),
    metric(alias=4, int_value=5),
    metric(alias=9, long_value=7),
])
DBIRTH = payload(TS + 10, 1, [
    metric("Drive/Speed", alias=10, datatype=9, ts=TS),
    metric("Drive/Fault", alias=11, datatype=11, is_null=True),
    metric("Recipe", alias=12, datatype=19, template=field(1, 2, b"v1")
           + field(2, 2, metric("Setpoint", datatype=10, double=1.5))
           + field(4, 2, b"RecipeType")),
    metric("Batch", alias=13, datatype=16, dataset=field(1, 0, 2)
           + field(2, 2, b"a") + field(2, 2, b"b")
           + field(3, 0, 3) + field(3, 0, 12)
           + field(4, 2, field(1, 2, field(1, 0, 7)) + field(1, 2, field(6, 2, b"x")))),
])
DDATA = payload(TS + 2000, 2, [metric(alias=10, int_value=3), metric(alias=12)])
NDEATH = payload(None, None, [metric("bdSeq", datatype=8, long_value=0)])


# --- sparkplug: [selector][u16 len][payload] per message --------------------

def spb(*msgs):
    out = b""
    for sel, p in msgs:
        out += bytes([sel]) + struct.pack("<H", len(p)) + p
    return out


write("sparkplug", "nbirth-ndata", spb((0, NBIRTH), (1, NDATA)))
write("sparkplug", "nbirth-dbirth-ddata", spb((0, NBIRTH), (4, DBIRTH), (5, DDATA)))
write("sparkplug", "ndata-before-birth", spb((1, NDATA), (0, NBIRTH), (2, NDEATH), (1, NDATA)))
write("sparkplug", "two-nodes", spb((0, NBIRTH), (8, NBIRTH), (9, NDATA), (16 | 1, NDATA)))
state = b'{"online":true,"timestamp":1796000000000}'
write("sparkplug", "state", spb((0xFE, state), (0xFE, b"OFFLINE")))
write("sparkplug", "free-topic",
      bytes([0xFF, 26]) + b"spBv1.0/g/DDATA/n/d/extra" + b"\x00" + struct.pack("<H", 0))


# --- mqtt_mapping: options then messages ------------------------------------

def s(text):
    if text is None:
        return b"\xff"
    b = text.encode()
    return bytes([len(b)]) + b


def mq_options(fmt, drop=False, max_payload=4096, idp=None, tp=None, stream=None):
    return bytes([fmt, int(drop)]) + struct.pack("<H", max_payload) + s(idp) + s(tp) + s(stream)


def mq_msg(topic, body, retain=False, content_type=None, prop=None):
    flags = int(retain) | (2 if content_type is not None else 0) | (4 if prop else 0)
    out = bytes([flags]) + s(topic)
    if content_type is not None:
        out += s(content_type)
    if prop:
        out += s(prop[0]) + s(prop[1])
    return out + struct.pack("<H", len(body)) + body


state_json = json.dumps({"id": "evt-1", "ts": "2026-11-29T10:00:00Z", "machine": "m1",
                         "state": "running", "n": 3}).encode()
write("mqtt_mapping", "json-pointers",
      mq_options(0, idp="/id", tp="/ts", stream="{2}/{3}")
      + mq_msg("plant/line3/m1/state", state_json)
      + mq_msg("plant/line3/m1/state", b'{"id": 42, "ts": 1796000000000}', retain=True)
      + mq_msg("plant/line3/m1/state", b'{"ts": "yesterday"}'))
write("mqtt_mapping", "json-plain",
      mq_options(0, stream="line3/{topic}")
      + mq_msg("a/b", b"\xef\xbb\xbf[1,2,{\"a\":null}]", content_type="application/json",
               prop=("site", "hamburg"))
      + mq_msg("a/b", b"not json"))
write("mqtt_mapping", "json-drop-oversize",
      mq_options(0, drop=True, max_payload=16, idp="/a~1b/0")
      + mq_msg("x", b'{"a/b": ["id-0"]}')
      + mq_msg("x", b'{"a/b": ["this one is longer than sixteen bytes"]}'))
write("mqtt_mapping", "raw",
      mq_options(1, stream="{1}")
      + mq_msg("cam/7/jpeg", bytes(range(64)), content_type="image/jpeg")
      + mq_msg("", b""))
write("mqtt_mapping", "sparkplug",
      mq_options(2)
      + mq_msg("spBv1.0/plant-a/NBIRTH/press-1", NBIRTH)
      + mq_msg("spBv1.0/plant-a/NDATA/press-1", NDATA)
      + mq_msg("spBv1.0/plant-a/DBIRTH/press-1/drive", DBIRTH)
      + mq_msg("spBv1.0/plant-a/DDATA/press-1/drive", DDATA)
      + mq_msg("spBv1.0/STATE/scada", b"ONLINE")
      + mq_msg("plant/not-sparkplug", b"\x08\x01"))
write("mqtt_mapping", "sparkplug-template",
      mq_options(2, stream="sp/{3}/{4}")
      + mq_msg("spBv1.0/plant-a/NBIRTH/press-1", NBIRTH)
      + mq_msg("spBv1.0/plant-a/NDATA/press-1", b"\xff\xff"))


# --- http_body: [content type selector][body] --------------------------------

event = {
    "specversion": "1.0",
    "id": "conf-4711-1",
    "source": "urn:mes:hamburg",
    "type": "com.example.mes.confirmation",
    "subject": "line3/order-4711",
    "time": "2026-11-29T10:00:00Z",
    "datacontenttype": "application/json",
    "data": {"order": "4711", "qty": 5},
}
ev2 = dict(event, id="conf-4711-2", time="2026-11-29T11:00:00.123+01:00")
b64 = {"specversion": "1.0", "id": "bin-1", "data_base64": "aGVsbG8=",
       "datacontenttype": "application/octet-stream", "sequence": "7", "x-line": 3}
escaped = '{"specversion":"1.0","id":"\\u0069d-\\"q\\"","\\u0073ubject":"line\\/3","data":null}'
write("http_body", "single", b"\x00" + json.dumps(event).encode())
write("http_body", "batch", b"\x01" + json.dumps([event, ev2, b64]).encode())
write("http_body", "ndjson",
      b"\x02" + ("\n".join(json.dumps(e) for e in [event, ev2, b64]) + "\n\n").encode())
write("http_body", "ndjson-crlf", b"\x03" + (json.dumps(event) + "\r\n" + escaped + "\r\n").encode())
write("http_body", "json-array-bom", b"\x04\xef\xbb\xbf" + json.dumps([event]).encode())
write("http_body", "json-object-params", b"\x05" + escaped.encode())
write("http_body", "batch-bad-second", b"\x06" + json.dumps([event, {"id": ""}]).encode())
write("http_body", "duplicate-attribute",
      b"\x00" + b'{"specversion":"1.0","id":"a","id":"b","source":"s","originsource":"t"}')


# --- admin_inputs: [0 replay body | 1 since | 2 dead-letter query][rest] -----

write("admin_inputs", "replay-seq", b'\x00{"from_seq": 31}')
write("admin_inputs", "replay-since-age", b'\x00{"since": "2h"}')
write("admin_inputs", "replay-since-time", b'\x00{"since": "2026-11-29T08:00:00Z"}')
write("admin_inputs", "replay-both", b'\x00{"from_seq": 1, "since": "90m"}')
write("admin_inputs", "since-age", b"\x011h 30m")
write("admin_inputs", "since-time", b"\x012026-11-29T08:00:00.5+01:00")
write("admin_inputs", "query-sink", b"\x02sink=central")
write("admin_inputs", "query-escaped", b"\x02sink=a%20b&sink=c&x")


# --- config: the shipped examples ---------------------------------------------

for name in sorted(os.listdir(os.path.join(ROOT, "config"))):
    if name.endswith(".toml"):
        os.makedirs(os.path.join(HERE, "config"), exist_ok=True)
        shutil.copyfile(os.path.join(ROOT, "config", name), os.path.join(HERE, "config", name))
