//! The layering of `src/` holds: every top-level module imports only modules of lower layers, and
//! exactly the ones the map in docs/ARCHITECTURE.md ("Layers") lists for it. A lower layer can
//! never import a higher one, so there is no cycle. Test code (`#[cfg(test)]` items and the files
//! they declare) is exempt, and so is `main.rs`, the binary at the very top.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// One row of the map: a module, its layer, and the modules it imports.
#[derive(Debug, Clone)]
struct Row {
    layer: u32,
    module: String,
    imports: BTreeSet<String>,
}

/// Imports found in the code: importer → imported → the first file that does it.
type Imports = BTreeMap<String, BTreeMap<String, PathBuf>>;

const MAP_HEADER: &str = "| layer | module | owns | imports |";

/// The rows of the map table in `doc`.
fn map_rows(doc: &str) -> Vec<Row> {
    let mut lines = doc.lines().skip_while(|l| l.trim() != MAP_HEADER).skip(2);
    let mut rows = Vec::new();
    while let Some(line) = lines.next().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 4, "docs/ARCHITECTURE.md map row has {} cells: {line}", cells.len());
        let layer = cells[0].parse().unwrap_or_else(|_| panic!("layer must be a number: {line}"));
        let names = |cell: &str| -> BTreeSet<String> {
            cell.split(',').map(|n| n.trim().trim_matches('`').to_string()).filter(|n| !n.is_empty() && n != "—").collect()
        };
        rows.push(Row { layer, module: cells[1].trim_matches('`').to_string(), imports: names(cells[3]) });
    }
    assert!(!rows.is_empty(), "docs/ARCHITECTURE.md has no table headed `{MAP_HEADER}`");
    rows
}

/// What is wrong with the code against the map: upward or same-layer imports in the map itself,
/// modules missing from it, and imports the map does not list (or lists but the code lacks).
fn violations(rows: &[Row], modules: &BTreeSet<String>, imports: &Imports) -> Vec<String> {
    let mut found = Vec::new();
    let layer: BTreeMap<&str, u32> = rows.iter().map(|r| (r.module.as_str(), r.layer)).collect();
    for module in modules {
        if !layer.contains_key(module.as_str()) {
            found.push(format!("`{module}` is a top-level module of src/ but has no row in the map"));
        }
    }
    for row in rows {
        if !modules.contains(&row.module) {
            found.push(format!("the map lists `{}`, which is not a top-level module of src/", row.module));
        }
        for imported in &row.imports {
            match layer.get(imported.as_str()) {
                Some(&l) if l < row.layer => {}
                Some(&l) => found.push(format!(
                    "the map lets `{}` (layer {}) import `{imported}` (layer {l}): a module may import only lower layers",
                    row.module, row.layer
                )),
                None => found.push(format!("the map lets `{}` import `{imported}`, which has no row", row.module)),
            }
        }
        let actual = imports.get(&row.module).cloned().unwrap_or_default();
        for (imported, file) in &actual {
            if !row.imports.contains(imported) {
                found.push(format!(
                    "`{}` imports `{imported}` ({}), which the map does not allow",
                    row.module,
                    file.display()
                ));
            }
        }
        for imported in row.imports.iter().filter(|i| !actual.contains_key(*i)) {
            found.push(format!("the map says `{}` imports `{imported}`, but it does not: remove it from the map", row.module));
        }
    }
    found
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| match &a.meta {
        syn::Meta::List(list) => list.path.is_ident("cfg") && list.tokens.to_string().trim() == "test",
        _ => false,
    })
}

fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    use syn::Item::*;
    match item {
        Const(i) => &i.attrs,
        Enum(i) => &i.attrs,
        ExternCrate(i) => &i.attrs,
        Fn(i) => &i.attrs,
        ForeignMod(i) => &i.attrs,
        Impl(i) => &i.attrs,
        Macro(i) => &i.attrs,
        Mod(i) => &i.attrs,
        Static(i) => &i.attrs,
        Struct(i) => &i.attrs,
        Trait(i) => &i.attrs,
        TraitAlias(i) => &i.attrs,
        Type(i) => &i.attrs,
        Union(i) => &i.attrs,
        Use(i) => &i.attrs,
        _ => &[],
    }
}

/// Walks one top-level module (its files and inline modules, test code skipped) and records which
/// other top-level modules it names: `crate::x` in paths, `use` trees and macro arguments, and
/// `super::…` chains that climb to the crate root.
struct Walker<'a> {
    top: &'a str,
    /// Depth below the crate root of the module being visited (the top-level module is 1).
    depth: usize,
    /// Where the files of the visited module's child modules live.
    dir: PathBuf,
    file: PathBuf,
    found: BTreeMap<String, PathBuf>,
}

impl Walker<'_> {
    fn record(&mut self, name: &str) {
        if name != self.top {
            self.found.entry(name.to_string()).or_insert_with(|| self.file.clone());
        }
    }

    /// The top-level module a path names, if it starts at the crate root.
    fn root_segment<'p>(&self, segments: &'p [String]) -> Option<&'p str> {
        match segments.first().map(String::as_str) {
            Some("crate") => segments.get(1).map(String::as_str),
            Some("super") => {
                let climbs = segments.iter().take_while(|s| *s == "super").count();
                (climbs == self.depth).then(|| segments.get(climbs).map(String::as_str)).flatten()
            }
            _ => None,
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.use_leaf(prefix, n.ident.to_string()),
            syn::UseTree::Rename(r) => self.use_leaf(prefix, r.ident.to_string()),
            syn::UseTree::Glob(_) => self.use_leaf(prefix, String::new()),
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(prefix, t)),
        }
    }

    fn use_leaf(&mut self, prefix: &[String], leaf: String) {
        let mut segments = prefix.to_vec();
        if !leaf.is_empty() {
            segments.push(leaf);
        }
        if let Some(name) = self.root_segment(&segments).map(str::to_string) {
            self.record(&name);
        }
    }

    /// `crate::x` inside macro arguments (`format!`, `tracing::info!`, …), which syn leaves as tokens.
    fn tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, tree) in trees.iter().enumerate() {
            match tree {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id) if id == "crate" => {
                    if let (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)), Some(TokenTree::Ident(name))) =
                        (trees.get(i + 1), trees.get(i + 2), trees.get(i + 3))
                        && a.as_char() == ':'
                        && b.as_char() == ':'
                    {
                        self.record(&name.to_string());
                    }
                }
                // `#[serde(deserialize_with = "crate::config::env::path")]` names a function too.
                TokenTree::Literal(lit) => {
                    let text = lit.to_string();
                    if let Some(name) = text.strip_prefix("\"crate::").and_then(|rest| rest.split("::").next()) {
                        self.record(name.trim_end_matches('"'));
                    }
                }
                _ => {}
            }
        }
    }

    fn walk_file(&mut self, path: &Path) {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let previous = std::mem::replace(&mut self.file, path.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(path).to_path_buf());
        for item in &file.items {
            self.visit_item(item);
        }
        self.file = previous;
    }
}

impl<'ast> Visit<'ast> for Walker<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if !is_test_only(item_attrs(item)) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_impl_item_fn(&mut self, item: &'ast syn::ImplItemFn) {
        if !is_test_only(&item.attrs) {
            syn::visit::visit_impl_item_fn(self, item);
        }
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        let name = item.ident.to_string();
        let dir = self.dir.join(&name);
        let parent_dir = std::mem::replace(&mut self.dir, dir.clone());
        self.depth += 1;
        match &item.content {
            Some((_, items)) => items.iter().for_each(|i| self.visit_item(i)),
            None => {
                let flat = parent_dir.join(format!("{name}.rs"));
                self.walk_file(&if flat.exists() { flat } else { dir.join("mod.rs") });
            }
        }
        self.depth -= 1;
        self.dir = parent_dir;
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(name) = self.root_segment(&segments).map(str::to_string) {
            self.record(&name);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_attribute(&mut self, attr: &'ast syn::Attribute) {
        if let syn::Meta::List(list) = &attr.meta {
            self.tokens(list.tokens.clone());
        }
        syn::visit::visit_attribute(self, attr);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

/// The top-level modules `src/lib.rs` declares, and what each one imports.
fn code_imports(src: &Path) -> (BTreeSet<String>, Imports) {
    let lib = syn::parse_file(&std::fs::read_to_string(src.join("lib.rs")).unwrap()).unwrap();
    let mut modules = BTreeSet::new();
    let mut imports = Imports::new();
    for item in &lib.items {
        let syn::Item::Mod(module) = item else { continue };
        if is_test_only(&module.attrs) {
            continue;
        }
        let name = module.ident.to_string();
        let mut walker = Walker { top: &name, depth: 0, dir: src.to_path_buf(), file: PathBuf::new(), found: BTreeMap::new() };
        walker.visit_item_mod(module);
        imports.insert(name.clone(), walker.found);
        modules.insert(name);
    }
    (modules, imports)
}

#[test]
fn every_module_imports_only_lower_layers_as_the_map_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let (modules, imports) = code_imports(&root.join("src"));
    let found = violations(&map_rows(&doc), &modules, &imports);
    assert!(found.is_empty(), "layering (docs/ARCHITECTURE.md, \"Layers\"):\n  {}", found.join("\n  "));
}

#[test]
fn the_check_catches_upward_imports_cycles_and_drift() {
    let row = |layer, module: &str, imports: &[&str]| Row {
        layer,
        module: module.into(),
        imports: imports.iter().map(|s| s.to_string()).collect(),
    };
    let modules: BTreeSet<String> = ["news", "window", "detect"].map(String::from).into();
    let code = |edges: &[(&str, &str)]| -> Imports {
        let mut imports = Imports::new();
        for (from, to) in edges {
            imports.entry(from.to_string()).or_default().insert(to.to_string(), PathBuf::from(format!("src/{from}/mod.rs")));
        }
        imports
    };
    let map = [row(0, "news", &[]), row(1, "window", &["news"]), row(2, "detect", &["window"])];
    assert!(violations(&map, &modules, &code(&[("window", "news"), ("detect", "window")])).is_empty());

    // The code reaches up (and so makes a cycle with the edge the map allows).
    let found = violations(&map, &modules, &code(&[("window", "news"), ("window", "detect"), ("detect", "window")]));
    assert_eq!(found, ["`window` imports `detect` (src/window/mod.rs), which the map does not allow"]);

    // A map that allows a cycle is refused whatever the code does.
    let cyclic = [row(0, "news", &[]), row(1, "window", &["news", "detect"]), row(2, "detect", &["window"])];
    let found = violations(&cyclic, &modules, &code(&[("window", "news"), ("window", "detect"), ("detect", "window")]));
    assert!(found.iter().any(|f| f.contains("may import only lower layers")), "{found:?}");

    // Drift either way, and a module the map forgot.
    let found = violations(&map[..2], &modules, &code(&[("detect", "window")]));
    assert!(found.iter().any(|f| f.contains("`detect` is a top-level module of src/ but has no row")), "{found:?}");
    assert!(found.iter().any(|f| f.contains("the map says `window` imports `news`, but it does not")), "{found:?}");
}

#[test]
fn the_walker_sees_paths_uses_macros_and_skips_test_code() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod c;\npub mod d;\n#[cfg(test)]\nmod e;\n").unwrap();
    std::fs::create_dir(src.join("a")).unwrap();
    std::fs::write(src.join("a/mod.rs"), "mod inner;\nuse crate::{b::X, c};\n#[derive(serde::Deserialize)]\nstruct S { #[serde(with = \"crate::e::f\")] x: u8 }\n#[cfg(test)]\nmod tests { use crate::d::Y; }\n").unwrap();
    std::fs::write(src.join("a/inner.rs"), "fn f() { tracing::info!(\"{}\", crate::d::NAME); super::super::b::g(); }\n").unwrap();
    for name in ["b", "c", "d"] {
        std::fs::write(src.join(format!("{name}.rs")), "").unwrap();
    }
    let (modules, imports) = code_imports(src);
    assert_eq!(modules, ["a", "b", "c", "d"].map(String::from).into());
    let a: Vec<&String> = imports["a"].keys().collect();
    assert_eq!(a, ["b", "c", "d", "e"]);
}
