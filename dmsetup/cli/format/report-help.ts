/**
 * The help texts libdm's report prints on stderr (libdm-report.c: _display_fields and
 * _display_selection_help): the field list with types, for `-S help` and for a selection naming
 * an unknown field; without types, for `-o help` and an unknown `-o`/`-O` field; and the selection
 * syntax. dmsetup's statistics fields are not listed: udm has no dm-stats, so no such field can be
 * shown or compared.
 */
import { FIELDS, type FieldSection } from "./report-fields.js";

const SECTION_TITLES: Record<FieldSection, string> = {
  name: "Mapped Device Name",
  info: "Mapped Device Information",
  deps: "Mapped Device Relationship Information",
  splitname: "Mapped Device Name Components",
  special: "Special",
};

/**
 * libdm pads ids to the longest id of dmsetup's fields: `writes_merged_per_sec`, a statistics
 * field. Kept, so that the list reads as dmsetup's does.
 */
const ID_WIDTH = "writes_merged_per_sec".length;

const line = (id: string, desc: string, type?: string) =>
  `  ${id.padEnd(ID_WIDTH)} - ${desc}${type === undefined ? "" : ` [${type}]`}\n`;

/** The report types' prefixes (dmsetup.c's _report_types): `PREFIX_all` names a section's fields. */
export const SECTION_PREFIXES: Partial<Record<FieldSection, string>> = {
  name: "name_",
  info: "info_",
  deps: "deps_",
  splitname: "splitname_",
};

/**
 * _display_fields, then the blank (" ") line its callers print after it. With `types` (the
 * selection help, `-S help`), each field's type; with `all` (the field help, `-o help`), each
 * section's `PREFIX_all` line first.
 */
export function fieldListHelp(opts: { types: boolean; all: boolean } = { types: true, all: false }): string {
  let out = "";
  let section: FieldSection | undefined;
  for (const f of FIELDS) {
    if (f.section !== section) {
      if (section !== undefined) out += " \n";
      const title = `${SECTION_TITLES[f.section]} Fields`;
      out += `${title}\n${"-".repeat(title.length)}\n`;
      section = f.section;
      const prefix = SECTION_PREFIXES[section];
      if (opts.all && prefix !== undefined) out += line(`${prefix}all`, "All fields in this section.");
    }
    out += line(f.id, f.desc, opts.types ? (f.num ? "number" : "string") : undefined);
  }
  const special = opts.types ? "unselectable number" : undefined;
  out += line("help", "Show help.", special);
  out += line("?", "Show help.", special);
  return `${out} \n`;
}

export const SELECTION_HELP = `Selection operands
------------------
  field               - Reporting field.
  number              - Non-negative integer value.
  size                - Floating point value with units, 'm' unit used by default if not specified.
  percent             - Non-negative integer with or without % suffix.
  string              - Characters quoted by ' or " or unquoted.
  string list         - Strings enclosed by [ ] or { } and elements delimited by either
                        "all items must match" or "at least one item must match" operator.
  regular expression  - Characters quoted by ' or " or unquoted.
 
Selection operators
-------------------
  Comparison operators:
        =~  - Matching regular expression. [regex]
        !~  - Not matching regular expression. [regex]
         =  - Equal to. [number, size, percent, string, string list, time]
        !=  - Not equal to. [number, size, percent, string, string_list, time]
        >=  - Greater than or equal to. [number, size, percent, time]
         >  - Greater than. [number, size, percent, time]
        <=  - Less than or equal to. [number, size, percent, time]
         <  - Less than. [number, size, percent, time]
     since  - Since specified time (same as '>='). [time]
     after  - After specified time (same as '>'). [time]
     until  - Until specified time (same as '<='). [time]
    before  - Before specified time (same as '<'). [time]
 
  Logical and grouping operators:
      &&  - All fields must match
       ,  - All fields must match
      ||  - At least one field must match
       #  - At least one field must match
       !  - Logical negation
       (  - Left parenthesis
       )  - Right parenthesis
       [  - List start
       ]  - List end
       {  - List subset start
       }  - List subset end
 
`;
