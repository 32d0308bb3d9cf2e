"""Where a compiled step moves bytes without computing: an XLA HLO dump's fills, copies and slices.

Reads the after-optimizations HLO text of one module (an XLA dump: `XLA_FLAGS="--xla_dump_to=DIR
--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*_step.*"`) and lists, per non-fused computation
(the entry, each while body), the instructions that only move data, by the bytes they write:

  fill                  a fusion rooted at a broadcast whose operands are all constants (or
                        none): a constant fill, e.g. the zeros jax lowers a scan's stacked
                        outputs to; or a bare broadcast of a constant
  copy                  `copy` and fusions rooted at a copy
  transpose             `transpose` and fusions rooted at a transpose
  dynamic-slice         fusions rooted at a dynamic-slice (a scan's per-iteration slice of a
                        stacked operand, copied when its consumer is a library call or kernel)
  dynamic-update-slice  fusions rooted at a dynamic-update-slice (a scan writing its outputs;
                        counted by the update's bytes: the buffer is written in place)
  uninitialised         `AllocateBuffer` custom calls (lax.empty on GPU and TPU: no bytes written)

Bytes count each instruction once, and `runs` says how often it runs per execution of the
module: the product of the known trip counts (XLA's `known_trip_count`) of the while loops around
it (a loop without one counts once); `bytes x runs` is what it writes per step. Work that
XLA moved into an async computation (or any other called computation but a fusion) counts in the
computation that calls it. An async fusion (`fusion-start` / `fusion-done`: how XLA on GPU runs
a while body's slices of its stacked operands) counts once, at its `fusion-done`, by the bytes
it yields. The profile (`tools/bench_train.py --profile`) gives the time; this gives what each
op is, and its shape. The eighteenth session found 23.5 GB of zero fills per micro-batch at
bench_h200 with it (docs/performance.md row 68).

  python tools/hlo_report.py /tmp/dump --top 40 --out hlo_report.json
  python tools/hlo_report.py /tmp/dump/module_0123.jit__step.sm_9.0a_gpu_after_optimizations.txt
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import sys
from typing import NamedTuple

CATEGORIES = ('fill', 'copy', 'transpose', 'dynamic-slice', 'dynamic-update-slice',
              'uninitialised')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2, 'f16': 2,
          'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
          'c128': 16}
_COMP = re.compile(r'^(ENTRY )?%?([\w.\-]+) .*\{\s*$')
_INSTR = re.compile(r'^\s*(ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]\w*)\[([\d,]*)\]')
_OPERAND = re.compile(r'%([\w.\-]+)(?:#(\d+))?')     # `%name`, or `%tuple#k`: its element k


@dataclasses.dataclass(frozen=True)
class Row:
  category: str
  computation: str
  name: str
  shape: str
  bytes: int
  op_name: str
  runs: int = 1


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: an array `bf16[8,4096]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


class Instr(NamedTuple):
  """One HLO instruction line: `[ROOT] %name = shape opcode(rest`."""
  is_root: bool
  name: str
  shape: str
  opcode: str
  rest: str


def parse(text: str) -> dict[str, list[Instr]]:
  """{computation: its instructions} of an HLO module's text (the one HLO-text parser of the
  tools: bench_train's trace attribution reads it too)."""
  comps: dict[str, list[Instr]] = {}
  cur = None
  for line in text.splitlines():
    if not line.startswith((' ', '\t')):
      m = _COMP.match(line)
      cur = m.group(2) if m else None
      if cur is not None:
        comps[cur] = []
      continue
    m = _INSTR.match(line) if cur is not None else None
    if m:
      comps[cur].append(Instr(bool(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5)))
  return comps


class Moved(NamedTuple):
  """What one instruction is (opcode; a fusion's kind, e.g. kLoop, kInput, kCustom) and the
  bytes it reads and writes."""
  opcode: str
  kind: str
  bytes: int


def instruction_bytes(text: str) -> dict[str, Moved]:
  """{instruction: Moved} of every instruction outside fused computations: the bytes
  of its result plus those of its array operands, i.e. what it reads and writes if it touches
  each element once. An upper bound where an op reads part of an operand (a slice of a stacked
  array) or updates a buffer in place, so such ops look faster, not slower; an operand whose
  shape the text does not give (a nested tuple's element) counts nothing."""
  comps = parse(text)
  fused = _fused(comps)
  shapes = {i.name: i.shape for instrs in comps.values() for i in instrs}

  def operand_bytes(name, element):
    shape = shapes.get(name, '')
    if element is None:                  # a whole operand; a tuple one is passed, not read
      return 0 if shape.startswith('(') else shape_bytes(shape)
    arrays = _ARRAY.findall(shape)       # `%t#k`: element k of a (flat) tuple
    k = int(element)
    return shape_bytes('{}[{}]'.format(*arrays[k])) if k < len(arrays) else 0

  out = {}
  for comp, instrs in comps.items():
    if comp in fused:
      continue
    for i in instrs:
      operands = _OPERAND.findall(i.rest.split(')', 1)[0])
      reads = sum(operand_bytes(o, k or None) for o, k in operands)
      kind = re.search(r'\bkind=(\w+)', i.rest)
      out[i.name] = Moved(i.opcode, kind.group(1) if kind else '', shape_bytes(i.shape) + reads)
  return out


def _fused(comps: dict[str, list[Instr]]) -> set[str]:
  """The computations that fusions (sync or async) call: their instructions run inside one
  kernel, not as ops of their own."""
  return {_called(i.rest) for instrs in comps.values() for i in instrs
          if i.opcode in ('fusion', 'fusion-start')}


def _called(rest: str) -> str | None:
  m = re.search(r'calls=%?([\w.\-]+)', rest)
  return m.group(1) if m else None


def _operands(rest: str) -> list[str]:
  """Operand names of an instruction line's rest (after its opening parenthesis)."""
  return re.findall(r'%([\w.\-]+)', rest.split(')', 1)[0])


def _category(opcode: str, rest: str, roots: dict, constants: set) -> str | None:
  """The instruction's category, or None. constants: the names of its computation's constants."""
  if opcode == 'custom-call':
    return 'uninitialised' if 'custom_call_target="AllocateBuffer"' in rest else None
  if opcode == 'broadcast':
    return 'fill' if set(_operands(rest)) <= constants else None
  if opcode in ('copy', 'transpose'):
    return opcode
  if opcode != 'fusion':
    return None
  root = roots.get(_called(rest), ('', ''))[0]
  if root == 'broadcast' and set(_operands(rest)) <= constants:
    return 'fill'
  if root in ('copy', 'transpose', 'dynamic-slice', 'dynamic-update-slice'):
    return root
  return None


def report(text: str) -> list[Row]:
  """Every data-movement instruction of the module outside fused computations, largest first,
  each under the computation that runs it (a while body, the entry)."""
  comps = parse(text)
  shapes = {c: {i.name: i.shape for i in instrs} for c, instrs in comps.items()}
  roots = {c: next(((i.opcode, i.rest) for i in instrs if i.is_root), ('', ''))
           for c, instrs in comps.items()}
  fused, caller = _fused(comps), {}      # other callees -> the computation calling them
  for comp, instrs in comps.items():
    for i in instrs:
      callee = _called(i.rest)
      if callee is not None and i.opcode not in ('fusion', 'fusion-start'):
        caller.setdefault(callee, comp)

  def owner(comp):
    seen = set()
    while comp in caller and comp not in seen:
      seen.add(comp)
      comp = caller[comp]
    return comp

  loops = {}                     # while body -> (the computation running the loop, trip count)
  for comp, instrs in comps.items():
    for i in instrs:
      body = re.search(r'body=%?([\w.\-]+)', i.rest) if i.opcode == 'while' else None
      if body:
        n = re.search(r'known_trip_count"?:\{"n":"(\d+)"', i.rest)
        loops[body.group(1)] = (comp, int(n.group(1)) if n else 1)

  def runs(comp, depth=0):
    comp = owner(comp)
    if comp not in loops or depth > len(loops):
      return 1
    holder, n = loops[comp]
    return n * runs(holder, depth + 1)

  rows = []
  for comp, instrs in comps.items():
    if comp in fused:
      continue
    constants = {i.name for i in instrs if i.opcode == 'constant'}
    starts = {i.name: i for i in instrs if i.opcode == 'fusion-start'}
    for i in instrs:
      opcode, rest = i.opcode, i.rest          # an async fusion: its start's callee and operands
      if opcode == 'fusion-done':
        start = starts.get(next(iter(_operands(rest)), ''))
        opcode, rest = ('fusion', start.rest) if start else (opcode, rest)
      cat = _category(opcode, rest, roots, constants)
      if cat is None:
        continue
      nbytes = 0 if cat == 'uninitialised' else shape_bytes(i.shape)
      if cat == 'dynamic-update-slice' and opcode == 'fusion':   # the update, not the buffer
        callee = _called(rest)
        ops = _operands(roots[callee][1])
        if len(ops) > 1:
          nbytes = shape_bytes(shapes[callee].get(ops[1], ''))
      meta = re.search(r'op_name="([^"]*)"', i.rest)
      rows.append(Row(cat, owner(comp), i.name, i.shape.split('{')[0], nbytes,
                      meta.group(1) if meta else '', runs(comp)))
  return sorted(rows, key=lambda r: -r.bytes)


def totals(rows: list[Row]) -> list[dict]:
  """[{category, computation, ops, bytes, runs, bytes_per_step}] summed over `report`'s rows
  (bytes per run of the computation, which runs `runs` times per step), largest per step
  first."""
  acc = collections.defaultdict(lambda: [0, 0, 1])
  for r in rows:
    a = acc[(r.category, r.computation)]
    a[0] += r.bytes
    a[1] += 1
    a[2] = r.runs
  out = [{'category': c, 'computation': comp, 'ops': n, 'bytes': b, 'runs': k,
          'bytes_per_step': b * k} for (c, comp), (b, n, k) in acc.items()]
  return sorted(out, key=lambda t: (-t['bytes_per_step'], -t['bytes']))


def per_step(sums: list[dict]) -> dict[str, int]:
  """{category: bytes written per step} over `totals`' rows, largest first."""
  acc = collections.Counter()
  for t in sums:
    acc[t['category']] += t['bytes_per_step']
  return dict(acc.most_common())


def find_module(path: str, module: str) -> str:
  """The after-optimizations HLO text at `path` (a file, or the largest match in a dump dir)."""
  if os.path.isfile(path):
    return path
  files = [f for f in glob.glob(os.path.join(path, '*after_optimizations.txt'))
           if re.search(module, os.path.basename(f))]
  if not files:
    raise SystemExit(f'hlo_report: no *after_optimizations.txt matching {module!r} in {path} '
                     f'(dump with --xla_dump_to=DIR --xla_dump_hlo_as_text)')
  return max(files, key=os.path.getsize)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('path', help='an after-optimizations HLO text file or an XLA dump directory')
  ap.add_argument('--module', default='', help='regex on the dump file names (default: any; '
                  'the largest module is read)')
  ap.add_argument('--top', type=int, default=30, help='largest instructions to list')
  ap.add_argument('--out', default='', help='write the JSON report here')
  args = ap.parse_args(argv)
  path = find_module(args.path, args.module)
  with open(path) as f:
    rows = report(f.read())
  sums = totals(rows)
  steps = per_step(sums)
  print(f'{path}\n\n{"category":22s} {"computation":40s} {"ops":>5s} {"MB per run":>11s} '
        f'{"runs":>5s} {"GB per step":>12s}')
  for t in sums:
    print(f'{t["category"]:22s} {t["computation"][:40]:40s} {t["ops"]:5d} '
          f'{t["bytes"] / 1e6:11.1f} {t["runs"]:5d} {t["bytes_per_step"] / 1e9:12.2f}')
  print('\nper step: ' + ', '.join(f'{c} {b / 1e9:.1f} GB' for c, b in steps.items()))
  print(f'\n{"MB":>9s} {"runs":>5s}  {"category":20s} {"computation":28s} {"shape":44s} op_name')
  for r in rows[:args.top]:
    print(f'{r.bytes / 1e6:9.1f} {r.runs:5d}  {r.category:20s} {r.computation[:28]:28s} '
          f'{r.shape[:44]:44s} {r.op_name[-90:]}')
  out = {'tool': 'hlo_report', 'file': path, 'totals': sums, 'per_step': steps,
         'rows': [dataclasses.asdict(r) for r in rows[:args.top]]}
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == '__main__':
  main(sys.argv[1:])
