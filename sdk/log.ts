// Structured logs through winston. A host process may pass its own logger; every module takes a
// child({ component }). Decisions are logged with their reason, never per packet.
import winston from 'winston';

export type Logger = winston.Logger;

let root: Logger | undefined;

/** One JSON object per line, with a timestamp and an error's stack. */
export const logFormat = () => winston.format.combine(winston.format.timestamp(), winston.format.errors({ stack: true }), winston.format.json());

export function defaultLogger(): Logger {
  root ??= winston.createLogger({
    level: process.env.TCP_STITCH_LOG_LEVEL ?? 'info',
    format: logFormat(),
    // stderr: stdout belongs to command output (status, JSON) that scripts parse.
    transports: [new winston.transports.Console({ stderrLevels: ['error', 'warn', 'info', 'http', 'verbose', 'debug', 'silly'] })],
  });
  return root;
}

export function componentLogger(component: string, parent?: Logger): Logger {
  return (parent ?? defaultLogger()).child({ component });
}
