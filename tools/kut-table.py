#!/usr/bin/env python3
"""The table of tools/kvm-unit-tests.sh, from a console log with its KUT-RESULT and KUT-LOG lines:
one row per test, a column per layer and VMM; then, for svm.flat, every subtest whose result
differs between the two VMMs at a layer.

Usage: tools/kut-table.py CONSOLE_LOG [--json]
"""
import json
import re
import sys

# 124: coreutils timeout; 143: busybox timeout's SIGTERM; 127: kvm-unit-tests' unhandled exception
# (exit code 0x3f).
# How each VMM's own errors begin (QEMU's warnings are not errors).
VMM_ERROR = {"nvmm": re.compile(r"nvmm: error:"), "qemu": re.compile(r"qemu-system-x86_64: (?!warning)")}
STATUS = {"1": "PASS", "3": "FAIL", "77": "SKIP", "124": "TIMEOUT", "143": "TIMEOUT", "127": "CRASH"}


def parse(path):
    """Results by (layer, VMM, test). A VMM's own failure exits 1 like a pass through debug-exit
    (QEMU's too), so a status 1 with the VMM's error line in the log is ERR(1), not PASS."""
    results, logs, order = {}, {}, []
    for line in open(path, errors="replace"):
        line = line.replace("\r", "").rstrip("\n")
        if m := re.search(r"KUT-RESULT (L\d) (\w+) (\S+) (\d+)", line):
            layer, vmm, name, status = m.groups()
            results[(layer, vmm, name)] = STATUS.get(status, f"ERR({status})")
            if name not in order:
                order.append(name)
        elif m := re.search(r"KUT-LOG (L\d) (\w+) (\S+): (.*)", line):
            logs.setdefault(m.groups()[:3], []).append(m.group(4))
    for key, lines in logs.items():
        if results.get(key) == "PASS" and any(VMM_ERROR[key[1]].match(l) for l in lines):
            results[key] = "ERR(1)"
    return results, logs, order


def subtests(lines):
    """How many times each report line came out: 'PASS: name', 'FAIL: name'... Addresses and
    counts in a name differ between two VMMs' memory layouts, so numbers become '#'."""
    out = {}
    for l in lines:
        if m := re.match(r"(PASS|FAIL|SKIP|XFAIL|XPASS): (.*)", l):
            key = (re.sub(r"0x[0-9a-fA-F]+|\b[0-9a-fA-F]*[0-9][0-9a-fA-F]*\b", "#", m.group(2)), m.group(1))
            out[key] = out.get(key, 0) + 1
    return out


def main():
    results, logs, order = parse(sys.argv[1])
    if not results:
        sys.exit("kut-table: no KUT-RESULT line in the console log")
    columns = [(l, v) for l in ("L1", "L2") for v in ("nvmm", "qemu") if any(k[:2] == (l, v) for k in results)]
    if "--json" in sys.argv:
        json.dump({n: {f"{l} {v}": results.get((l, v, n)) for l, v in columns} for n in order}, sys.stdout, indent=1)
        return
    print(f"{'test':<34}" + "".join(f"{l + ' ' + v:>12}" for l, v in columns))
    for n in order:
        print(f"{n:<34}" + "".join(f"{results.get((l, v, n), '-'):>12}" for l, v in columns))
    for layer in ("L1", "L2"):
        for n in order:
            a, b = logs.get((layer, "nvmm", n)), logs.get((layer, "qemu", n))
            if not a or not b or not n.startswith("svm"):
                continue
            sa, sb = subtests(a), subtests(b)
            diff = [(t, sa.get(t, 0), sb.get(t, 0)) for t in dict.fromkeys([*sa, *sb]) if sa.get(t) != sb.get(t)]
            print(f"\n{layer} {n}: {sum(sa.values())} report lines under nvmm, {sum(sb.values())} under QEMU; "
                  f"{len(diff)} differ (times seen under each)")
            for (name, result), x, y in diff:
                print(f"  {result + ': ' + name[:66]:<72} nvmm {x:<3} qemu {y}")


main()
