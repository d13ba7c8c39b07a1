//! Arbitrary bytes through the definition parser, the checks, compilation,
//! TAG expansion and round planning: none of them may panic, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

use flame_engine::definition::{DataSpecEntry, Dataset, Design, JobFile, ModelSpec};
use flame_engine::workflow::Workflow;
use flame_engine::{compile, expand, plan, tree};

fuzz_target!(|data: &[u8]| {
    // Each file of the folder form on its own.
    let _ = serde_json::from_slice::<JobFile>(data);
    let _ = serde_json::from_slice::<Design>(data);
    let _ = serde_json::from_slice::<Vec<DataSpecEntry>>(data);
    let _ = serde_json::from_slice::<ModelSpec>(data);
    let _ = serde_json::from_slice::<Dataset>(data);
    // A whole workflow: check it, and plan it when it is valid.
    if let Ok(wf) = serde_json::from_slice::<Workflow>(data) {
        let def = wf.into_definition("fuzz.json".into());
        if def.check().is_empty()
            && let Ok(tasks) = expand::tasks(&def)
            && tasks.len() <= 10_000
        {
            let _ = tree::derive(&def, &tasks);
            let _ = compile::compile(&def);
            let trainers = tasks.iter().filter(|t| t.is_data_consumer).count();
            if let Ok(a) = compile::settings(&def, trainers) {
                for round in 1..=2 {
                    let _ = plan::build(&def, &tasks, a.selection, compile::seed(&def), round);
                }
            }
        }
    }
});
