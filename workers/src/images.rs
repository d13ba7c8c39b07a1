//! Image folders in torchvision's `ImageFolder` layout: a folder per class
//! (classes numbered in the sorted order of their names), PNG or JPEG files
//! in them; or `train/` and `test/` folders of that layout. Images are
//! decoded, resized (bilinear) to one size, scaled to [0, 1] and normalized
//! per channel, as `transforms.Resize`, `ToTensor` and `Normalize` do; an
//! example is `[channels, height, width]`.

use std::path::{Path, PathBuf};

use crate::split::{Data, Split};

/// How images are turned into examples (from the dataset URL's query).
#[derive(Clone, Debug, PartialEq)]
pub struct Transform {
    /// `size=WxH`: resize to this; none: every image must already have one size.
    pub size: Option<(u32, u32)>,
    /// `channels=1|3`: grayscale or RGB; none: 1 when every image is grayscale, else 3.
    pub channels: Option<usize>,
    /// `mean=` per channel (one value for all), subtracted after scaling to [0, 1].
    pub mean: Vec<f32>,
    /// `std=` per channel (one value for all), divided by after.
    pub std: Vec<f32>,
}

impl Transform {
    /// The transform a dataset URL's query asks for.
    pub fn from_query(q: &str) -> Result<Self, String> {
        let value = |key: &str| q.split('&').filter_map(|p| p.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v);
        let numbers = |key: &str, default: f32| -> Result<Vec<f32>, String> {
            match value(key) {
                None => Ok(vec![default]),
                Some(v) => v
                    .split(',')
                    .map(|x| x.parse::<f32>().ok().filter(|x| x.is_finite()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("'{key}' must be numbers separated by commas, not '{v}'")),
            }
        };
        let size = match value("size") {
            None => None,
            Some(v) => {
                let (w, h) = v.split_once('x').ok_or_else(|| format!("'size' is WIDTHxHEIGHT, e.g. 28x28, not '{v}'"))?;
                match (w.parse::<u32>(), h.parse::<u32>()) {
                    (Ok(w), Ok(h)) if w > 0 && h > 0 => Some((w, h)),
                    _ => return Err(format!("'size' is WIDTHxHEIGHT, e.g. 28x28, not '{v}'")),
                }
            }
        };
        let channels = match value("channels") {
            None => None,
            Some("1") => Some(1),
            Some("3") => Some(3),
            Some(v) => return Err(format!("'channels' is 1 (grayscale) or 3 (RGB), not '{v}'")),
        };
        let std = numbers("std", 1.0)?;
        if std.iter().any(|s| *s <= 0.0) {
            return Err("'std' must be positive".into());
        }
        Ok(Self { size, channels, mean: numbers("mean", 0.0)?, std })
    }
}

fn files(root: &Path) -> Result<Vec<(PathBuf, usize, String)>, String> {
    let mut classes: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| format!("{}: {e}", root.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(format!("{} has no class folders (torchvision's ImageFolder layout: one folder per class)", root.display()));
    }
    let mut out = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let mut images: Vec<PathBuf> = std::fs::read_dir(root.join(class))
            .map_err(|e| format!("{}: {e}", root.join(class).display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().and_then(|x| x.to_str()).is_some_and(|x| matches!(x.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
            })
            .collect();
        images.sort();
        out.extend(images.into_iter().map(|p| (p, label, class.clone())));
    }
    Ok(out)
}

/// An image file, decoded, with its class.
type Decoded = (PathBuf, usize, image::DynamicImage);

fn decode(list: Vec<(PathBuf, usize, String)>) -> Result<Vec<Decoded>, String> {
    list.into_iter()
        .map(|(path, label, _)| {
            let img = image::open(&path).map_err(|e| format!("{}: cannot decode the image: {e}", path.display()))?;
            Ok((path, label, img))
        })
        .collect()
}

/// Transforms decoded images into rows.
fn rows(list: &[Decoded], t: &Transform, channels: usize) -> Result<Split, String> {
    let mut x = Vec::new();
    let mut y = Vec::with_capacity(list.len());
    let mut shape: Option<(u32, u32)> = t.size;
    for (path, label, img) in list {
        let resized;
        let img = match t.size {
            Some((w, h)) if (img.width(), img.height()) != (w, h) => {
                resized = img.resize_exact(w, h, image::imageops::FilterType::Triangle);
                &resized
            }
            _ => img,
        };
        let (w, h) = (img.width(), img.height());
        if *shape.get_or_insert((w, h)) != (w, h) {
            let (sw, sh) = shape.unwrap_or((w, h));
            return Err(format!("{} is {w}x{h}, earlier images {sw}x{sh}: give the dataset URL size=WxH", path.display()));
        }
        let pixels: Vec<u8> = if channels == 1 { img.to_luma8().into_raw() } else { img.to_rgb8().into_raw() };
        let plane = (w * h) as usize;
        // HWC bytes to CHW floats, scaled and normalized per channel.
        for c in 0..channels {
            let (mean, std) = (t.mean[c.min(t.mean.len() - 1)], t.std[c.min(t.std.len() - 1)]);
            x.extend((0..plane).map(|i| (f32::from(pixels[i * channels + c]) / 255.0 - mean) / std));
        }
        y.push(*label as i64);
    }
    let (w, h) = shape.unwrap_or((0, 0));
    let features = channels * (w * h) as usize;
    Ok(Split { shape: vec![channels, h as usize, w as usize], ..Split::classes(x, y, features) })
}

/// Loads an image folder: `train/` and `test/` when it has both, else its
/// class folders with every fifth image of each class held out for testing.
pub fn load(root: &Path, t: &Transform) -> Result<Data, String> {
    let (train, test) = if root.join("train").is_dir() && root.join("test").is_dir() {
        let (train, test) = (files(&root.join("train"))?, files(&root.join("test"))?);
        let names = |l: &[(PathBuf, usize, String)]| {
            let mut n: Vec<String> = l.iter().map(|f| f.2.clone()).collect();
            n.dedup();
            n
        };
        if names(&train) != names(&test) {
            return Err(format!("train/ has classes {:?} and test/ {:?}: they must be the same folders", names(&train), names(&test)));
        }
        (train, test)
    } else {
        let all = files(root)?;
        let mut index_in_class = std::collections::BTreeMap::<usize, usize>::new();
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for f in all {
            let i = index_in_class.entry(f.1).or_default();
            if *i % 5 == 4 {
                test.push(f)
            } else {
                train.push(f)
            }
            *i += 1;
        }
        (train, test)
    };
    if train.is_empty() {
        return Err(format!("{} holds no PNG or JPEG images in its class folders", root.display()));
    }
    let classes = train.iter().map(|f| f.1).max().map_or(0, |m| m + 1);
    let (train, test) = (decode(train)?, decode(test)?);
    let gray = || train.iter().chain(&test).all(|(_, _, i)| i.color().channel_count() <= 2);
    let channels = t.channels.unwrap_or_else(|| if gray() { 1 } else { 3 });
    if t.mean.len() > 1 && t.mean.len() != channels || t.std.len() > 1 && t.std.len() != channels {
        return Err(format!("'mean' and 'std' give one value or one per channel ({channels})"));
    }
    Ok(Data { train: rows(&train, t, channels)?, test: rows(&test, t, channels)?, classes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, w: u32, h: u32, value: u8) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        image::GrayImage::from_pixel(w, h, image::Luma([value])).save(path).expect("save");
    }

    #[test]
    fn class_folders_become_labelled_normalized_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..5 {
            write(&dir.path().join(format!("cat/{i}.png")), 4, 4, 255);
            write(&dir.path().join(format!("dog/{i}.png")), 4, 4, 0);
        }
        let t = Transform::from_query("mean=0.5&std=0.5").expect("transform");
        let d = load(dir.path(), &t).expect("images");
        assert_eq!((d.train.len(), d.test.len(), d.classes), (8, 2, 2), "every fifth image of a class is held out");
        assert_eq!(d.train.shape, [1, 4, 4]);
        assert_eq!(d.train.y, [0, 0, 0, 0, 1, 1, 1, 1], "classes in the sorted order of their folders");
        assert!(d.train.x[..16].iter().all(|v| (*v - 1.0).abs() < 1e-6), "white (1.0) normalized to (1 - 0.5) / 0.5");
        assert!(d.train.x[64..80].iter().all(|v| (*v + 1.0).abs() < 1e-6));
        // Resized to a size, as RGB.
        let rgb = load(dir.path(), &Transform::from_query("size=2x3&channels=3").expect("transform")).expect("resized");
        assert_eq!((rgb.train.shape.clone(), rgb.train.features), (vec![3, 3, 2], 18));
        // Images of two sizes without size=, and an image that does not decode, are named.
        write(&dir.path().join("dog/9.png"), 5, 5, 0);
        assert!(load(dir.path(), &t).expect_err("sizes").contains("size=WxH"));
        std::fs::write(dir.path().join("dog/9.png"), b"not a png").expect("write");
        let e = load(dir.path(), &t).expect_err("corrupt");
        assert!(e.contains("9.png") && e.contains("cannot decode"), "{e}");
    }

    #[test]
    fn train_and_test_folders_are_the_splits_and_options_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (split, n) in [("train", 3), ("test", 1)] {
            for c in ["a", "b"] {
                for i in 0..n {
                    write(&dir.path().join(format!("{split}/{c}/{i}.png")), 2, 2, 100);
                }
            }
        }
        let d = load(dir.path(), &Transform::from_query("").expect("transform")).expect("images");
        assert_eq!((d.train.len(), d.test.len()), (6, 2));
        assert!(Transform::from_query("size=28").is_err());
        assert!(Transform::from_query("channels=2").is_err());
        assert!(Transform::from_query("std=0").is_err());
        assert!(
            load(&dir.path().join("train/a"), &Transform::from_query("").expect("t")).expect_err("no classes").contains("class folders")
        );
    }
}
