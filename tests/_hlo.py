"""Reading compiled (XLA:CPU) HLO text in tests: computations, while bodies, dot operand types."""
import re


def computations(hlo: str) -> dict:
    """Every computation of a compiled module's text: name -> body text."""
    out, cur, buf = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
        if m:
            cur, buf = m.group(1), []
        elif line == "}" and cur:
            out[cur], cur = "\n".join(buf), None
        elif cur:
            buf.append(line)
    return out


def loop_computations(hlo: str) -> dict:
    """The while bodies of a compiled module and all they call (fusions...): name -> text."""
    comps = computations(hlo)
    todo = [b for c in comps.values() for b in re.findall(r"while\(.*?body=%?([\w.\-]+)", c)]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", comps[name])
    return {n: comps[n] for n in seen}


def while_bodies(hlo: str) -> str:
    """The text of every while body of a compiled module and of all it calls."""
    return "\n".join(loop_computations(hlo).values())


def dot_operand_dtypes(comps: dict) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in `comps` (from computations / loop_computations)."""
    out = []
    for body in comps.values():
        types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", body))
        for lhs, rhs in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", body):
            out.append((types.get(lhs, "?"), types.get(rhs, "?")))
    return out
