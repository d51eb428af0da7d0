// The part of stagecast.d.ts written by hand: the functions of api/static/stagecast.js, typed
// with the generated types. generate.mjs appends it (without these comment lines);
// test_declarations.py checks that every export of stagecast.js is declared here.

/** An event of one type: `EventOf<"token">` is `Token`. */
export type EventOf<T extends RunEvent["type"]> = Extract<RunEvent, { type: T }>;

/** followRun's per-type handlers: each gets its own event type. */
export type EventHandlers = { [T in RunEvent["type"]]?: (event: EventOf<T>) => void };

export interface ClientOptions {
  /** Sent as a Bearer header (fetch) or `?api_key=` (EventSource). */
  apiKey?: string;
}

export interface StartRunOptions extends ClientOptions {
  chain: string;
  inputs?: Record<string, unknown>;
  model?: string;
  onDisconnect?: "continue" | "cancel";
  reuse?: ReuseRequest;
}

export interface FollowOptions extends ClientOptions {
  on?: EventHandlers;
  onEvent?: (event: RunEvent) => void;
  onEnd?: (event: RunEnded) => void;
  onError?: (error: StagecastError) => void;
  onStatus?: (status: "open" | "reconnecting" | "closed" | "ended") => void;
  /** Start after this seq. */
  after?: number;
}

export interface FollowHandle {
  close(): void;
  readonly lastSeq: number;
  readonly closed: boolean;
}

export interface ResolvedCitation {
  marker: number;
  stage: string | null;
  source: Source | null;
}

export declare const EVENT_TYPES: readonly RunEvent["type"][];

export declare class StagecastError extends Error {
  constructor(status: number, code: string, message: string, details?: Record<string, unknown>);
  status: number;
  code: string;
  details: Record<string, unknown>;
}

export declare function resolveCitations(
  stageEnd: StageEnded | null | undefined,
  sourceEvents: SourceFound[],
): ResolvedCitation[];
export declare function listChains(baseUrl: string, options?: ClientOptions): Promise<ChainSummary[]>;
export declare function getChain(
  baseUrl: string,
  chainId: string,
  options?: ClientOptions,
): Promise<ChainDetail>;
export declare function startRun(baseUrl: string, options: StartRunOptions): Promise<RunCreated>;
export declare function getRun(
  baseUrl: string,
  runId: string,
  options?: ClientOptions,
): Promise<RunStatusModel>;
export declare function cancelRun(
  baseUrl: string,
  runId: string,
  options?: ClientOptions,
): Promise<CancelAccepted>;
export declare function answerInput(
  baseUrl: string,
  runId: string,
  answer: InputAnswer,
  options?: ClientOptions,
): Promise<AnswerAccepted>;
/** A refused answer's problems by answer field (`""`: the answer as a whole), or null. */
export declare function answerProblems(error: unknown): Record<string, string> | null;
export declare function listModels(baseUrl: string, options?: ClientOptions): Promise<ModelInfo[]>;
export declare function listRecordings(
  baseUrl: string,
  options?: ClientOptions,
): Promise<RecordingSummary[]>;
export declare function startReplay(
  baseUrl: string,
  recording: string,
  options?: ClientOptions & { speed?: number | "max" },
): Promise<RunCreated>;
export declare function followRun(
  baseUrl: string,
  runId: string,
  options?: FollowOptions,
): FollowHandle;
