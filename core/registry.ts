/**
 * Target registry: target classes are declared with the `@target` decorator, collected into a
 * `TargetRegistry`, and instantiated through a tsyringe container so the core's services are
 * injected into them. The core never names a target: built-ins and plugins register the same way.
 *
 * A plugin may carry its own copy of udm (and so of tsyringe, whose type information is private
 * to each copy). A declaration is therefore only data that every copy reads alike: the type info
 * under a `Symbol.for` key on the class, the constructor's tokens in reflect-metadata's
 * process-wide registry. The registry that loads a class makes it injectable in its own tsyringe.
 */
import "reflect-metadata";
import { inject, injectable, type DependencyContainer, type InjectionToken } from "tsyringe";
import { DmError } from "./errors.js";
import { importPlugin } from "./plugins.js";
import type { Target, TargetClass, TargetTypeInfo, TargetVersion } from "./target.js";

const TARGET_INFO = Symbol.for("udm.targetInfo");

export interface TargetOptions {
  name: string;
  version: TargetVersion;
  /** TargetFeatures bits. */
  features?: number;
  /**
   * Constructor parameters, in order, as injection tokens (usually `Services.*`). Equivalent to
   * `@inject(token)` on each parameter, and usable from plain JavaScript.
   */
  inject?: InjectionToken<unknown>[];
}

/**
 * Class decorator: marks a class as a target type. Works as a standard (TC39) decorator and as a
 * legacy `experimentalDecorators` one; only the latter can add `@inject` parameter decorators.
 */
export function target(options: TargetOptions) {
  return <C extends TargetClass>(cls: C): C => {
    const name = options.name;
    if (!/^[A-Za-z0-9_.-]{1,15}$/.test(name)) {
      // DM_MAX_TYPE_NAME is 16 bytes including the NUL.
      throw new Error(`invalid target type name '${name}': 1-15 characters from [A-Za-z0-9_.-]`);
    }
    options.inject?.forEach((token, i) => inject(token)(cls, undefined as never, i));
    const info: TargetTypeInfo = { name, version: options.version, features: options.features ?? 0 };
    Object.defineProperty(cls, TARGET_INFO, { value: info, enumerable: false });
    return cls;
  };
}

/** The name/version/features a class was declared with, or undefined if it is not a target. */
export function targetInfoOf(cls: unknown): TargetTypeInfo | undefined {
  if (typeof cls !== "function") return undefined;
  return Object.prototype.hasOwnProperty.call(cls, TARGET_INFO)
    ? (cls as unknown as Record<symbol, TargetTypeInfo>)[TARGET_INFO]
    : undefined;
}

export interface RegisteredTarget {
  readonly info: TargetTypeInfo;
  readonly cls: TargetClass;
}

/** A plugin loaded by `loadPlugin`: what it was asked for, where it was found, what it added. */
export interface LoadedPlugin {
  readonly module: string;
  readonly file: string;
  readonly targets: string[];
}

export class TargetRegistry {
  /** Newest first, like the kernel's list (new registrations go to the head). */
  private readonly types: RegisteredTarget[] = [];
  private readonly loaded: LoadedPlugin[] = [];

  constructor(readonly container: DependencyContainer) {}

  register(...classes: TargetClass[]): void {
    const entries = classes.map((cls) => {
      const info = targetInfoOf(cls);
      if (!info) throw new Error(`${cls.name || "class"} is not a target: declare it with @target({ name, version })`);
      return { info, cls };
    });
    // All or nothing: check every name before adding any.
    const seen = new Set<string>();
    for (const { info } of entries) {
      if (this.get(info.name) || seen.has(info.name)) throw new Error(`'${info.name}' target already registered`);
      seen.add(info.name);
    }
    for (const entry of entries) {
      // Here rather than in @target: the class may come from another copy of udm (see the top).
      injectable()(entry.cls as never);
      this.types.unshift(entry);
    }
  }

  unregister(name: string): boolean {
    const i = this.types.findIndex((t) => t.info.name === name);
    if (i < 0) return false;
    this.types.splice(i, 1);
    return true;
  }

  get(name: string): RegisteredTarget | undefined {
    return this.types.find((t) => t.info.name === name);
  }

  list(): TargetTypeInfo[] {
    return this.types.map((t) => t.info);
  }

  /** Build one target instance for a table line, with services from `scope` (the table's container). */
  instantiate(name: string, scope: DependencyContainer): Target<unknown> | undefined {
    const entry = this.get(name);
    return entry ? (scope.resolve(entry.cls as never) as Target<unknown>) : undefined;
  }

  /**
   * Load a plugin: an ES module, by file path or package name (resolved from `baseDir`), that
   * exports target classes (declared with @target) and/or a `register(registry)` function.
   * Registers every target it exports, or none of them if any fails. Returns the names registered.
   */
  async loadPlugin(spec: string, baseDir = process.cwd()): Promise<string[]> {
    const { module: mod, file } = await importPlugin(spec, baseDir);
    const classes = Object.values(mod).filter((v): v is TargetClass => targetInfoOf(v) !== undefined);
    const before = new Set(this.types.map((t) => t.info.name));
    try {
      this.register(...new Set(classes));
      if (typeof mod.register === "function") await (mod.register as (r: TargetRegistry) => unknown)(this);
    } catch (err) {
      for (const t of this.list()) if (!before.has(t.name)) this.unregister(t.name);
      throw new DmError("EINVAL", `plugin ${spec}: ${(err as Error).message}`, { cause: err });
    }
    const added = this.list()
      .filter((t) => !before.has(t.name))
      .map((t) => t.name);
    if (added.length === 0) throw new DmError("EINVAL", `plugin ${spec}: exports no targets`);
    this.loaded.push({ module: spec, file, targets: added });
    return added;
  }

  /** The plugins loaded so far, first loaded first. */
  plugins(): LoadedPlugin[] {
    return this.loaded.map((p) => ({ ...p, targets: [...p.targets] }));
  }
}
