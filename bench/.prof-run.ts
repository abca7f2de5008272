import { measureInstalls } from './installs.ts';
const r = await measureInstalls('/tmp/bpffs-prof', 1);
console.log(JSON.stringify(r));
