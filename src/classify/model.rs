use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::ClassifyError;
use super::heads::Heads;
use crate::news::near::NearDuplicates;
use crate::news::{SENTIMENTS, Scores};

/// `labels.json`: what the model's outputs mean.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Labels {
    name: String,
    version: String,
    max_length: usize,
    inputs: [String; 2],
    outputs: Outputs,
    sentiment: Vec<String>,
    topics: Vec<String>,
    /// When a headline is a near-duplicate of one an analyst corrected, set on validation data for
    /// this model (`models/train/near_duplicates.py`); none: exact matches only.
    #[serde(default)]
    near_duplicates: Option<NearDuplicates>,
    /// A `heads.json` in the folder that scores instead of the graph's own heads (a refitted
    /// candidate); it reads the `embedding` output.
    #[serde(default)]
    heads: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Outputs {
    sentiment: String,
    topic: String,
    /// The pooled vector both heads read (model 2 on): what `model retrain` refits heads on.
    #[serde(default)]
    embedding: Option<String>,
}

/// A model folder: the files and the meaning of the outputs.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub dir: PathBuf,
    pub onnx: PathBuf,
    pub tokenizer: PathBuf,
    /// Names of the `input_ids` and `attention_mask` inputs.
    pub inputs: [String; 2],
    pub sentiment_output: String,
    pub topic_output: String,
    pub near_duplicates: Option<NearDuplicates>,
    pub embedding_output: Option<String>,
    /// Refitted heads that replace the graph's (see [`Heads`]).
    pub heads: Option<Arc<Heads>>,
    pub topics: Vec<String>,
    /// The tokens the model was trained with; longer inputs are cut there.
    pub trained_max_length: usize,
    id: Arc<str>,
}

impl ModelSpec {
    pub fn load(dir: &Path) -> Result<ModelSpec, ClassifyError> {
        let labels_path = dir.join("labels.json");
        let text = std::fs::read_to_string(&labels_path)
            .map_err(|e| ClassifyError::ModelFiles { path: labels_path.clone(), reason: e.to_string() })?;
        let labels: Labels = serde_json::from_str(&text)
            .map_err(|e| ClassifyError::ModelFiles { path: labels_path.clone(), reason: e.to_string() })?;
        if labels.sentiment != SENTIMENTS {
            return Err(ClassifyError::ModelFiles {
                path: labels_path,
                reason: format!("sentiment labels must be {SENTIMENTS:?}, found {:?}", labels.sentiment),
            });
        }
        if let Some(n) = labels.near_duplicates
            && !((0.0..=1.0).contains(&n.min_shared) && (0.0..=1.0).contains(&n.max_distance))
        {
            return Err(ClassifyError::ModelFiles {
                path: labels_path,
                reason: "near_duplicates: min_shared and max_distance must be in [0, 1]".into(),
            });
        }
        if labels.topics.is_empty() || labels.topics.len() > crate::news::MAX_TOPICS {
            let reason = format!("{} topics: a model has 1 to {}", labels.topics.len(), crate::news::MAX_TOPICS);
            return Err(ClassifyError::ModelFiles { path: labels_path, reason });
        }
        for topic in &labels.topics {
            if let Some(problem) = crate::news::label_problem(topic, crate::news::MAX_TOPIC_CHARS) {
                return Err(ClassifyError::ModelFiles { path: labels_path, reason: format!("topic {topic:?}: {problem}") });
            }
        }
        let id = format!("{}@{}", labels.name, labels.version);
        if let Some(problem) = crate::news::label_problem(&id, crate::news::MAX_MODEL_CHARS) {
            return Err(ClassifyError::ModelFiles { path: labels_path, reason: format!("name@version {id:?}: {problem}") });
        }
        let spec = ModelSpec {
            dir: dir.to_path_buf(),
            onnx: dir.join("model.onnx"),
            tokenizer: dir.join("tokenizer.json"),
            inputs: labels.inputs,
            sentiment_output: labels.outputs.sentiment,
            topic_output: labels.outputs.topic,
            near_duplicates: labels.near_duplicates,
            embedding_output: labels.outputs.embedding.clone(),
            heads: None,
            topics: labels.topics,
            trained_max_length: labels.max_length,
            id: id.into(),
        };
        for file in [&spec.onnx, &spec.tokenizer] {
            if !file.is_file() {
                return Err(ClassifyError::ModelFiles { path: file.clone(), reason: "missing".into() });
            }
        }
        let mut spec = spec;
        if let Some(file) = &labels.heads {
            if spec.embedding_output.is_none() {
                return Err(ClassifyError::ModelFiles { path: labels_path, reason: "`heads` needs `outputs.embedding`".into() });
            }
            spec.heads = Some(Arc::new(Heads::load(&dir.join(file), spec.topics.len())?));
        }
        Ok(spec)
    }

    /// `name@version`, recorded with every score.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Turns one item's class probabilities into named scores.
    pub fn scores(&self, sentiment: &[f32; 3], topic: &[f32]) -> Scores {
        let (topic_index, topic_score) = argmax(topic);
        let [p_negative, p_neutral, p_positive] = *sentiment;
        Scores {
            topic: self.topics[topic_index].clone(),
            topic_score,
            sentiment: sentiment_label(sentiment),
            p_negative,
            p_neutral,
            p_positive,
            sentiment_score: p_positive - p_negative,
            model: self.id.clone(),
        }
    }
}

/// The label of the likeliest sentiment (`[p_negative, p_neutral, p_positive]`); ties go to the first.
pub fn sentiment_label(p: &[f32; 3]) -> &'static str {
    SENTIMENTS[argmax(p).0]
}

/// Index and value of the largest element; the first one wins ties.
fn argmax(values: &[f32]) -> (usize, f32) {
    values.iter().copied().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, v)| if v > best.1 { (i, v) } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled labels.json and refitted heads with bytes changed at random (the same seeds each
    /// run): every folder gives a spec or an error, and a spec scores outputs of its own widths.
    #[test]
    fn damaged_labels_and_heads_give_errors_not_panics() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let labels = std::fs::read(root.join("labels.json")).unwrap();
        let mut with_heads: serde_json::Value = serde_json::from_slice(&labels).unwrap();
        with_heads["heads"] = "heads.json".into();
        let with_heads = with_heads.to_string().into_bytes();
        let heads = std::fs::read(root.join("refit/heads.json")).unwrap();
        let alphabet = b"{}[]\",:0123456789-.eE truenull\x00\xff";
        let mut rng = crate::rng::Lcg(7);
        let dir = tempfile::tempdir().unwrap();
        for file in ["model.onnx", "tokenizer.json"] {
            std::fs::write(dir.path().join(file), b"").unwrap();
        }
        let (mut loaded, mut refused) = (0, 0);
        for case in 0..600 {
            let (mut l, mut h) = (if case % 2 == 0 { labels.clone() } else { with_heads.clone() }, heads.clone());
            let target = if case % 3 == 0 { &mut h } else { &mut l };
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(target.len());
                match rng.below(3) {
                    0 => target[at] = alphabet[rng.below(alphabet.len())],
                    1 => target.truncate(at),
                    _ => target.insert(at, alphabet[rng.below(alphabet.len())]),
                }
                if target.is_empty() {
                    break;
                }
            }
            std::fs::write(dir.path().join("labels.json"), &l).unwrap();
            std::fs::write(dir.path().join("heads.json"), &h).unwrap();
            match ModelSpec::load(dir.path()) {
                Ok(spec) => {
                    loaded += 1;
                    let scores = spec.scores(&[0.2, 0.3, 0.5], &vec![0.1; spec.topics.len()]);
                    assert!(spec.topics.contains(&scores.topic));
                    if let Some(heads) = &spec.heads {
                        let (sentiment, topic) = heads.apply(&vec![0.5; heads.dims], 1).unwrap();
                        assert_eq!((sentiment.len(), topic.len()), (3, spec.topics.len()));
                    }
                }
                Err(ClassifyError::ModelFiles { .. }) => refused += 1,
                Err(other) => panic!("case {case}: {other}"),
            }
        }
        assert!(loaded > 0 && refused > 0, "{loaded} loaded, {refused} refused");
        // Heads that read nothing would split embeddings into empty rows.
        let topics = serde_json::from_slice::<serde_json::Value>(&labels).unwrap()["topics"].as_array().unwrap().len();
        let head = |classes: usize| serde_json::json!({"weight": vec![Vec::<f32>::new(); classes], "bias": vec![0.0; classes], "temperature": 1.0});
        let empty = serde_json::json!({"dims": 0, "sentiment": head(3), "topic": head(topics)});
        std::fs::write(dir.path().join("labels.json"), &with_heads).unwrap();
        std::fs::write(dir.path().join("heads.json"), empty.to_string()).unwrap();
        assert!(matches!(ModelSpec::load(dir.path()), Err(ClassifyError::ModelFiles { reason, .. }) if reason.contains("dims")));
    }

    /// Topics and the model's name ride on every story and become window groups: a model whose
    /// labels would make a role `aggregate` refuse its stories is refused at load.
    #[test]
    fn topics_and_name_are_bounded_as_scored_stories_are() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let labels: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join("labels.json")).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for file in ["model.onnx", "tokenizer.json"] {
            std::fs::write(dir.path().join(file), b"").unwrap();
        }
        let load = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut changed = labels.clone();
            change(&mut changed);
            std::fs::write(dir.path().join("labels.json"), changed.to_string()).unwrap();
            ModelSpec::load(dir.path()).map(|_| ()).map_err(|e| e.to_string())
        };
        assert_eq!(load(&|_| {}), Ok(()));
        let many: Vec<String> = (0..=crate::news::MAX_TOPICS).map(|i| format!("t{i}")).collect();
        assert!(load(&|l| l["topics"] = many.clone().into()).unwrap_err().contains("257 topics"));
        assert!(load(&|l| l["topics"][0] = "x".repeat(65).into()).unwrap_err().contains("65 characters"));
        assert!(load(&|l| l["topics"][0] = "a\tb".into()).unwrap_err().contains("control character"));
        assert!(load(&|l| l["name"] = "n".repeat(200).into()).unwrap_err().contains("name@version"));
    }
}
