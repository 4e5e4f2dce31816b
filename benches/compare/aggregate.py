#!/usr/bin/env python3
"""Result handling for benches/compare.sh.

  aggregate.py record ...   parse one wrk/h2load run and append a JSON line to the raw file
  aggregate.py idle ...     append the output of idle_conns.py as a JSON line
  aggregate.py report ...   medians over repetitions -> latest.json and latest.md
"""
import argparse
import json
import re
import statistics
import sys

PROXIES = ["balancer", "balancer-log", "nginx", "haproxy", "hyper"]
PROXY_LABEL = {
    "balancer": "balancer",
    "balancer-log": "balancer (access log on)",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "hyper": "thin hyper proxy",
}
# The proxies the balancer's ratios are taken against: the peers, and the floor of a bare hyper
# proxy (examples/thin_proxy.rs) when the run measured it.
REFS = ("nginx", "haproxy", "hyper")
SCENARIO_LABEL = {
    "small": "small GET, keep-alive, 64 conns",
    "close": "small GET, `Connection: close`, 64 conns",
    "large": "1 MiB responses, 16 conns",
    "upload": "64 KiB POST uploads, 64 conns",
    "c1000": "small GET, 1000 keep-alive conns",
    "h2": "HTTP/2 (h2c), 4 conns x 100 streams",
    "cached": "small cacheable GET from the proxy's cache, 64 conns",
    "h2up": "HTTP/2 to h2c backends, 4 conns x 100 streams",
}
METRICS = ["rps", "p50_ms", "p99_ms", "cpu_us_per_req", "peak_rss_kb"]


def parse_wrk(text):
    m = re.search(r"^WRKJSON (\{.*\})\s*$", text, re.M)
    if not m:
        raise ValueError("no WRKJSON line in wrk output")
    w = json.loads(m.group(1))
    secs = w["duration_us"] / 1e6
    socket_errors = w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"]
    return {
        "requests": w["requests"],
        "rps": w["requests"] / secs if secs else 0.0,
        "p50_ms": w["p50_us"] / 1000.0,
        "p99_ms": w["p99_us"] / 1000.0,
        "errors": socket_errors + w["err_status"],
        "error_detail": {k[4:]: w[k] for k in w if k.startswith("err_") and w[k]},
    }


def parse_h2load(text, log_path):
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not (m and r and s):
        raise ValueError("unrecognised h2load output")
    done, succeeded, failed, errored, timeout = (int(r.group(i)) for i in (3, 4, 5, 6, 7))
    non2xx = int(s.group(2)) + int(s.group(3)) + int(s.group(4))
    lat = []
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                lat.append(int(parts[2]))  # microseconds
    lat.sort()

    def pct(p):
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(round(p / 100.0 * len(lat) + 0.5)) - 1)] / 1000.0

    detail = {k: v for k, v in (("failed", failed), ("errored", errored),
                                ("timeout", timeout), ("non2xx", non2xx)) if v}
    return {
        "requests": done,
        "rps": float(m.group(3)),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        # "failed" includes errored and timed-out requests in h2load's count.
        "errors": max(failed, errored + timeout) + non2xx,
        "error_detail": detail,
    }


def cmd_record(a):
    with open(a.output) as f:
        text = f.read()
    try:
        rec = parse_wrk(text) if a.tool == "wrk" else parse_h2load(text, a.h2_log)
    except (ValueError, OSError) as e:
        print(f"aggregate: {a.proxy}/{a.scenario}: {e}; output kept in {a.output}",
              file=sys.stderr)
        rec = {"requests": 0, "rps": 0.0, "p50_ms": None, "p99_ms": None, "errors": None,
               "error_detail": {"unparsed": a.output}}
    cpu_s = a.cpu_ticks / a.clk_tck
    rec.update({
        "kind": "load", "rep": a.rep, "proxy": a.proxy, "scenario": a.scenario,
        "cpu_seconds": cpu_s,
        "cpu_us_per_req": cpu_s * 1e6 / rec["requests"] if rec["requests"] else None,
        "peak_rss_kb": a.hwm_kb,
    })
    with open(a.raw, "a") as f:
        f.write(json.dumps(rec) + "\n")
    p50 = "-" if rec["p50_ms"] is None else f"{rec['p50_ms']:.2f}"
    p99 = "-" if rec["p99_ms"] is None else f"{rec['p99_ms']:.2f}"
    cpu = "-" if rec["cpu_us_per_req"] is None else f"{rec['cpu_us_per_req']:.1f}"
    print(f"  {a.proxy:<13} {a.scenario:<7} {rec['rps']:>10.0f} req/s  p50 {p50:>7} ms  "
          f"p99 {p99:>7} ms  errors {rec['errors']}  cpu {cpu} us/req  "
          f"peak {a.hwm_kb / 1024:.1f} MiB")


def cmd_idle(a):
    with open(a.output) as f:
        text = f.read().strip().splitlines()
    try:
        rec = json.loads(text[-1])
    except (IndexError, ValueError):
        rec = {"bytes_per_conn": None, "error": "no output"}
    rec.update({"kind": "idle", "rep": a.rep, "proxy": a.proxy})
    with open(a.raw, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"  {a.proxy:<13} idle    {rec.get('alive')} of {rec.get('conns')} conns open, "
          f"{rec.get('bytes_per_conn')} bytes/conn "
          f"(RSS {rec.get('rss_before_kb', 0) / 1024:.1f} -> {rec.get('rss_after_kb', 0) / 1024:.1f} MiB)")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def per_rep_ratios(loads, scenario, ref):
    """The balancer's CPU/req and req/s over `ref`'s within each repetition. The box's speed
    drifts between repetitions (a third faster in one, for every proxy alike); proxies measured
    in the same repetition share it, so these pairs show the spread the medians hide."""
    out = []
    for rep in sorted({r["rep"] for r in loads}):
        pick = lambda p: next((r for r in loads if r["rep"] == rep and r["scenario"] == scenario
                               and r["proxy"] == p), None)
        b, o = pick("balancer"), pick(ref)
        if b and o:
            out.append({"rep": rep, "cpu_us_per_req": ratio(b["cpu_us_per_req"],
                                                            o["cpu_us_per_req"]),
                        "rps": ratio(b["rps"], o["rps"])})
    return out


def fmt(x, nd=0):
    if x is None:
        return "-"
    return f"{x:,.{nd}f}"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def cmd_report(a):
    raw = [json.loads(l) for l in open(a.raw) if l.strip()]
    with open(a.meta) as f:
        meta = json.load(f)
    loads = [r for r in raw if r["kind"] == "load"]
    idles = [r for r in raw if r["kind"] == "idle"]
    scenarios = [s for s in SCENARIO_LABEL if any(r["scenario"] == s for r in loads)]
    proxies = [p for p in PROXIES if any(r["proxy"] == p for r in raw)]

    summary = {}
    for s in scenarios:
        summary[s] = {}
        for p in proxies:
            runs = [r for r in loads if r["scenario"] == s and r["proxy"] == p]
            if not runs:
                continue
            m = {k: median([r.get(k) for r in runs]) for k in METRICS}
            errs = [r["errors"] for r in runs]
            m["errors"] = None if any(e is None for e in errs) else sum(errs)
            m["runs"] = len(runs)
            summary[s][p] = m
    idle = {}
    for p in proxies:
        runs = [r for r in idles if r["proxy"] == p]
        if runs:
            idle[p] = {
                "bytes_per_conn": median([r.get("bytes_per_conn") for r in runs]),
                "conns": runs[0].get("conns"),
                "alive": min(r.get("alive") or 0 for r in runs),
                "errors": sum(r.get("errors") or 0 for r in runs),
                "runs": len(runs),
            }
    ratios = {}
    for ref in REFS:
        ratios[ref] = {}
        for s in scenarios:
            b, o = summary[s].get("balancer"), summary[s].get(ref)
            if b and o:
                ratios[ref][s] = {k: ratio(b[k], o[k]) for k in METRICS}
                ratios[ref][s]["per_rep"] = per_rep_ratios(loads, s, ref)
        if "balancer" in idle and ref in idle:
            ratios[ref]["idle_bytes_per_conn"] = ratio(idle["balancer"]["bytes_per_conn"],
                                                       idle[ref]["bytes_per_conn"])

    out = {"meta": meta, "summary": summary, "idle_connections": idle,
           "ratios_balancer_over": ratios, "runs": raw}
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")

    L = []
    L.append("# balancer vs nginx vs HAProxy")
    L.append("")
    L.append(f"- Date: {meta['date']}")
    L.append(f"- Machine: {meta['nproc']} CPUs, {meta['cpu_model']}, {meta['mem']}, "
             f"Linux {meta['kernel']}")
    L.append(f"- Versions: balancer {meta['balancer_version']} ({meta['git']}), "
             f"{meta['nginx_version']}, {meta['haproxy_version']}, {meta['wrk_version']}, "
             f"{meta['h2load_version']}")
    L.append(f"- Method: {meta['reps']} repetition(s), proxies interleaved; {meta['duration_s']} s "
             f"per run after {meta['warmup_s']} s of warm-up; every proxy pinned to CPU "
             f"{meta['proxy_cpu']} (one worker/thread each) and started afresh for every run, "
             f"wrk/h2load and the two nginx backends on CPU {meta['load_cpu']}. Figures are "
             f"medians over repetitions; errors are summed over them.")
    if meta.get("note"):
        L.append(f"- Note: {meta['note']}")
    L.append("")
    L.append("CPU/req is user+system time of the proxy's processes divided by the requests "
             "served; peak RSS is the processes' VmHWM over the run (reset after the warm-up). "
             "Errors are socket errors (connect, read, write, timeout) plus non-2xx answers.")
    L.append("")
    L.append("## Results")
    L.append("")
    L.append("| scenario | proxy | req/s | p50 ms | p99 ms | errors | CPU µs/req | peak RSS MiB |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for s in scenarios:
        for p in proxies:
            m = summary[s].get(p)
            if not m:
                continue
            name = f"**{PROXY_LABEL[p]}**" if p == "balancer" else PROXY_LABEL[p]
            L.append(f"| {SCENARIO_LABEL[s]} | {name} | {fmt(m['rps'])} | {fmt(m['p50_ms'], 2)} | "
                     f"{fmt(m['p99_ms'], 2)} | {fmt(m['errors'])} | {fmt(m['cpu_us_per_req'], 1)} | "
                     f"{fmt(m['peak_rss_kb'] and m['peak_rss_kb'] / 1024, 1)} |")
    L.append("")
    L.append("## Ratios (balancer with access log off / other)")
    L.append("")
    L.append("Above 1 is better for req/s, below 1 is better for the others.")
    L.append("")
    L.append("The last two columns are the CPU/req and req/s ratios within each repetition, "
             "where both proxies ran minutes apart on the same box.")
    L.append("")
    L.append("| scenario | vs | req/s | p50 | p99 | CPU/req | peak RSS | CPU/req per rep | "
             "req/s per rep |")
    L.append("|---|---|---:|---:|---:|---:|---:|---|---|")
    for s in scenarios:
        for ref in REFS:
            r = ratios[ref].get(s)
            if r:
                reps = r.get("per_rep", [])
                cpu_reps = ", ".join(fmt_ratio(x["cpu_us_per_req"]) for x in reps)
                rps_reps = ", ".join(fmt_ratio(x["rps"]) for x in reps)
                L.append(f"| {SCENARIO_LABEL[s]} | {PROXY_LABEL[ref]} | {fmt_ratio(r['rps'])} | "
                         f"{fmt_ratio(r['p50_ms'])} | {fmt_ratio(r['p99_ms'])} | "
                         f"{fmt_ratio(r['cpu_us_per_req'])} | {fmt_ratio(r['peak_rss_kb'])} | "
                         f"{cpu_reps} | {rps_reps} |")
    own = summary.get("cached", {}).get("balancer"), summary.get("small", {}).get("balancer")
    if own[0] and own[1]:
        L.append("")
        L.append("Cached vs uncached small GET, balancer: CPU/req "
                 f"{fmt_ratio(ratio(own[0]['cpu_us_per_req'], own[1]['cpu_us_per_req']))}, "
                 f"req/s {fmt_ratio(ratio(own[0]['rps'], own[1]['rps']))}.")
    if idle:
        L.append("")
        L.append("## Memory per idle keep-alive connection")
        L.append("")
        L.append("Each connection served one small GET, then stayed open and idle; RSS growth "
                 "of the proxy's processes divided by the connections still open.")
        L.append("")
        L.append("| proxy | connections open | bytes/conn | balancer/this |")
        L.append("|---|---:|---:|---:|")
        for p in proxies:
            if p in idle:
                i = idle[p]
                r = ratio(idle.get("balancer", {}).get("bytes_per_conn"), i["bytes_per_conn"])
                L.append(f"| {PROXY_LABEL[p]} | {fmt(i['alive'])} of {fmt(i['conns'])} | "
                         f"{fmt(i['bytes_per_conn'])} | {fmt_ratio(r)} |")
    L.append("")
    with open(a.md, "w") as f:
        f.write("\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--raw", required=True)
    r.add_argument("--tool", choices=["wrk", "h2load"], required=True)
    r.add_argument("--output", required=True, help="the tool's stdout")
    r.add_argument("--h2-log", help="h2load --log-file output")
    r.add_argument("--proxy", required=True)
    r.add_argument("--scenario", required=True)
    r.add_argument("--rep", type=int, required=True)
    r.add_argument("--cpu-ticks", type=int, required=True)
    r.add_argument("--clk-tck", type=int, default=100)
    r.add_argument("--hwm-kb", type=int, required=True)
    r.set_defaults(func=cmd_record)
    i = sub.add_parser("idle")
    i.add_argument("--raw", required=True)
    i.add_argument("--output", required=True)
    i.add_argument("--proxy", required=True)
    i.add_argument("--rep", type=int, required=True)
    i.set_defaults(func=cmd_idle)
    p = sub.add_parser("report")
    p.add_argument("--raw", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--md", required=True)
    p.set_defaults(func=cmd_report)
    a = ap.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
