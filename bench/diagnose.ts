// Why a drain did not complete, from the switch's own log: its 'drain slow' warning carries the
// program's per-stream drain state and the stitch's sequence deltas. The drain
// condition (docs/handover.md, rule 8; translate.h drain_check), per stream s of far end s:
//   the other far end acknowledged everything the shell was handed:   ackFar(o) - d(s) >= handed(s)
//   the other far end's window covers the shell's advertised edge:    edgeFar(o) - d(s) >= boundary(s)

interface Side { boundary: number; handed: number; ackFar: number; edgeFar: number }

const signed = (x: number) => (x | 0);

/** One line per stuck stitch: which half of the condition fails for which stream, by how many bytes. */
export function drainDiagnosis(switchLogs: string[]): string[] {
  const out: string[] = [];
  for (const l of switchLogs) {
    if (!l.includes('drain slow: still draining')) continue;
    let o: { id?: number; seqDelta?: [number, number]; client?: Side; core?: Side; message?: string };
    try { o = JSON.parse(l); } catch { continue; }
    const d = o.seqDelta;
    if (!o.message?.startsWith('drain slow: still draining') || !o.client || !o.core || o.id === undefined || !d) continue;
    const sides = [o.client, o.core];
    const why: string[] = [];
    for (const s of [0, 1]) {
      const me = sides[s]!, other = sides[s ^ 1]!;
      const [name, far] = s === 0 ? ["C's stream", 'B'] : ["B's stream", 'C'];
      const ackShort = signed(me.handed - ((other.ackFar - d[s]!) >>> 0));
      const edgeShort = signed(me.boundary - ((other.edgeFar - d[s]!) >>> 0));
      if (ackShort > 0) why.push(`${name}: ${far} has not acknowledged ${ackShort} bytes the shell was handed`);
      if (edgeShort > 0) why.push(`${name}: ${far}'s window edge is ${edgeShort} bytes short of the edge the shell advertised`);
    }
    out.push(`stitch ${o.id}: ${why.join('; ') || 'condition holds now (the 1 ms hold never completed?)'}`);
  }
  return out;
}
