//! Crash recovery of the spool directory, run once by [`crate::Spool::open`]: deletes the
//! leftovers of interrupted stores, updates and removals, moves every message that cannot be read
//! back exactly (damaged header, unknown format version, lengths that disagree, an envelope
//! record that does not parse) to `corrupt/` with all its files, and loads the rest. The rules
//! are listed in the crate documentation ("On-disk layout"); this module is their one
//! implementation, kept apart from the write path so it can be reviewed on its own.

use super::*;

impl Shared {
    pub(crate) fn recover(
        &self,
        found: log::LogRecovery,
        log: &mut Log,
    ) -> Result<(Vec<Recovered>, RecoveryReport)> {
        let mut report = RecoveryReport::default();
        report.unknown.extend(found.unknown);
        for (file, reason) in found.quarantined {
            report.quarantined.push(SkippedFile { file, reason });
        }
        let mut msg_files = BTreeSet::new();
        let mut upd_files = HashSet::new();
        let mut data_files = HashSet::new();
        let mut env_files = BTreeMap::new();
        let entries = fs::read_dir(&self.msg_dir)
            .map_err(|e| context(e, "listing spool directory", &self.msg_dir))?;
        for entry in entries {
            let entry = entry.map_err(|e| context(e, "listing spool directory", &self.msg_dir))?;
            let Ok(name) = entry.file_name().into_string() else {
                report
                    .unknown
                    .push(entry.file_name().to_string_lossy().into_owned());
                continue;
            };
            if FilePool::is_free_name(&name) {
                self.pool.adopt(entry.path());
                continue;
            }
            if name.ends_with(&format!(".{TMP_EXT}")) {
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| context(e, "removing leftover", &path))?;
                report.removed_uncommitted.push(name);
                continue;
            }
            let parsed = name
                .split_once('.')
                .and_then(|(id, ext)| Some((id.parse::<MessageId>().ok()?, ext)));
            match parsed {
                Some((id, MSG_EXT)) => {
                    msg_files.insert(id);
                }
                Some((id, UPD_EXT)) => {
                    upd_files.insert(id);
                }
                Some((id, DATA_EXT)) => {
                    data_files.insert(id);
                }
                Some((id, ENV_EXT)) => {
                    env_files.insert(id, name);
                }
                _ => report.unknown.push(name),
            }
        }

        let mut messages = Vec::new();
        for &id in &msg_files {
            let has_upd = upd_files.remove(&id);
            let msg_name = format!("{id}.{MSG_EXT}");
            let skip = match self.load_message_file(id, has_upd) {
                Ok(found) => {
                    messages.push(found);
                    continue;
                }
                Err(skip) => skip,
            };
            match skip {
                Skip::Corrupt(file, problem) => {
                    tracing::error!(file = %self.msg_dir.join(&file).display(), problem = %problem, "quarantining spooled message");
                    self.quarantine(&msg_name)?;
                    if has_upd {
                        self.quarantine(&format!("{id}.{UPD_EXT}"))?;
                    }
                    report.quarantined.push(SkippedFile {
                        file,
                        reason: problem,
                    });
                }
            }
        }
        // Messages in the log: their updates are `.upd` files as for message files.
        let mut dropped = false;
        for m in found.messages {
            let has_upd = upd_files.remove(&m.id);
            let record = match m.envelope {
                Ok(record) => record,
                Err(problem) => {
                    // The record checked, so this is not damage on disk: written by a relay
                    // that got the envelope wrong. Kept in corrupt/ for an operator.
                    let name = format!("{}.log-record", m.id);
                    let bytes = log
                        .read_record(&m.loc)
                        .map_err(|e| context(e, "reading log record", log.dir()))?;
                    let path = self.dir.join(CORRUPT_DIR).join(&name);
                    fs::write(&path, bytes).map_err(|e| context(e, "quarantining", &path))?;
                    tracing::error!(id = %m.id, problem = %problem, "quarantining logged message");
                    log.append_removal(m.id, &m.loc)
                        .map_err(|e| context(e.into_io(), "writing message log", log.dir()))?;
                    dropped = true;
                    if has_upd {
                        self.quarantine(&format!("{}.{UPD_EXT}", m.id))?;
                    }
                    report.quarantined.push(SkippedFile {
                        file: name,
                        reason: problem,
                    });
                    continue;
                }
            };
            let mut envelope = record.envelope;
            let mut updated = false;
            if has_upd {
                let upd = format!("{}.{UPD_EXT}", m.id);
                let update = fs::read(self.msg_dir.join(&upd))
                    .map_err(|e| Skip::Corrupt(upd.clone(), format!("unreadable: {e}")))
                    .and_then(|bytes| decode_record(&upd, &bytes, m.data_len));
                match update {
                    Ok(update) => {
                        envelope = update.envelope;
                        updated = true;
                    }
                    Err(Skip::Corrupt(file, problem)) => {
                        // The message itself is intact: it stays, with the envelope it was
                        // stored with (recipients done since may get it again).
                        tracing::error!(file = %file, problem = %problem, "quarantining envelope update; the message keeps its stored envelope");
                        self.quarantine(&upd)?;
                        report.quarantined.push(SkippedFile {
                            file,
                            reason: problem,
                        });
                    }
                }
            }
            messages.push(Recovered {
                message: StoredMessage {
                    id: m.id,
                    envelope,
                    data_len: m.data_len,
                },
                layout: Layout::Log(m.loc),
                updated,
            });
        }
        if dropped {
            log.sync()
                .map_err(|e| context(e, "writing message log", log.dir()))?;
        }

        // Updates of removed messages (removal deletes the message file first).
        for id in upd_files {
            let name = format!("{id}.{UPD_EXT}");
            let path = self.msg_dir.join(&name);
            fs::remove_file(&path).map_err(|e| context(e, "removing leftover", &path))?;
            report.removed_uncommitted.push(name);
        }

        // Messages stored by earlier versions.
        for (id, name) in env_files {
            let path = self.msg_dir.join(&name);
            let has_data = data_files.remove(&id);
            let problem = if msg_files.contains(&id) {
                format!("{id}.{MSG_EXT} exists as well")
            } else {
                match fs::read(&path) {
                    Err(e) => format!("unreadable: {e}"),
                    Ok(bytes) => match EnvelopeRecord::decode(&bytes) {
                        Err(e) => e.to_string(),
                        Ok(_) if !has_data => "data file is missing".to_owned(),
                        Ok(record) => match fs::metadata(self.file(id, DATA_EXT)) {
                            Err(e) => format!("data file unreadable: {e}"),
                            Ok(meta) if meta.len() != record.data_len => format!(
                                "data file has {} bytes, envelope records {}",
                                meta.len(),
                                record.data_len
                            ),
                            Ok(_) => {
                                messages.push(Recovered {
                                    message: StoredMessage {
                                        id,
                                        envelope: record.envelope,
                                        data_len: record.data_len,
                                    },
                                    layout: Layout::Split,
                                    updated: false,
                                });
                                continue;
                            }
                        },
                    },
                }
            };
            tracing::error!(file = %path.display(), problem = %problem, "quarantining spooled message");
            self.quarantine(&name)?;
            if has_data {
                self.quarantine(&format!("{id}.{DATA_EXT}"))?;
            }
            report.quarantined.push(SkippedFile {
                file: name,
                reason: problem,
            });
        }
        for id in data_files {
            let name = format!("{id}.{DATA_EXT}");
            let path = self.msg_dir.join(&name);
            fs::remove_file(&path).map_err(|e| context(e, "removing uncommitted data", &path))?;
            report.removed_uncommitted.push(name);
        }
        if self.fsync && !(report.removed_uncommitted.is_empty() && report.quarantined.is_empty()) {
            // Not needed for correctness (recovery is idempotent), but keeps a second crash from
            // reporting the same leftovers again.
            sync_dir(&self.msg_dir)?;
            sync_dir(&self.dir.join(CORRUPT_DIR))?;
        }
        messages.sort_by_key(|m| m.message.id);
        report.removed_uncommitted.sort();
        report.unknown.sort();
        report.quarantined.sort_by(|a, b| a.file.cmp(&b.file));
        for name in &report.unknown {
            tracing::warn!(file = %self.msg_dir.join(name).display(), "unknown file in spool, left alone");
        }
        if !report.removed_uncommitted.is_empty() {
            tracing::info!(
                count = report.removed_uncommitted.len(),
                "removed leftovers of uncommitted writes"
            );
        }
        report.recovered = messages.len();
        Ok((messages, report))
    }

    /// Reads and checks `<id>.msg` (header, length, envelope record) and `<id>.upd` if present,
    /// without reading the data.
    fn load_message_file(&self, id: MessageId, has_upd: bool) -> Result<Recovered, Skip> {
        let name = format!("{id}.{MSG_EXT}");
        let corrupt = |problem: String| Skip::Corrupt(name.clone(), problem);
        let mut file = File::open(self.msg_dir.join(&name))
            .map_err(|e| corrupt(format!("unreadable: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| corrupt(format!("unreadable: {e}")))?
            .len();
        let mut raw = [0u8; HEADER_LEN];
        file.read_exact(&mut raw)
            .map_err(|e| corrupt(format!("header unreadable ({file_len} bytes): {e}")))?;
        let header = Header::decode(&raw).map_err(|e| corrupt(e.to_string()))?;
        if header.file_len() != Some(file_len) {
            return Err(corrupt(format!(
                "file has {file_len} bytes, header records {} of envelope and {} of data",
                header.envelope_len, header.data_len
            )));
        }
        // Bounded by the file length just checked, so a damaged header cannot ask for more
        // memory than the file has.
        let mut record = vec![0u8; header.envelope_len as usize];
        file.read_exact(&mut record)
            .map_err(|e| corrupt(format!("envelope unreadable: {e}")))?;
        let mut record = decode_record(&name, &record, header.data_len)?;
        if has_upd {
            let upd = format!("{id}.{UPD_EXT}");
            let bytes = fs::read(self.msg_dir.join(&upd))
                .map_err(|e| Skip::Corrupt(upd.clone(), format!("unreadable: {e}")))?;
            record = decode_record(&upd, &bytes, header.data_len)?;
        }
        Ok(Recovered {
            message: StoredMessage {
                id,
                envelope: record.envelope,
                data_len: header.data_len,
            },
            layout: Layout::Single {
                data_offset: header.data_offset(),
            },
            updated: has_upd,
        })
    }

    /// Moves a message directory entry to `corrupt/`, never overwriting an earlier one.
    fn quarantine(&self, name: &str) -> Result<()> {
        let to = log::unique(&self.dir.join(CORRUPT_DIR), name);
        Ok(rename(&self.msg_dir.join(name), &to)?)
    }
}

/// Why recovery did not load a message file, naming the file at fault: damaged or of a version
/// this relay does not read; the message's files are quarantined.
pub(crate) enum Skip {
    Corrupt(String, String),
}

/// Decodes an envelope record of a message file whose data is `data_len` bytes.
pub(crate) fn decode_record(
    file: &str,
    bytes: &[u8],
    data_len: u64,
) -> Result<EnvelopeRecord, Skip> {
    match EnvelopeRecord::decode(bytes) {
        Ok(record) if record.data_len == data_len => Ok(record),
        Ok(record) => Err(Skip::Corrupt(
            file.to_owned(),
            format!(
                "message has {data_len} bytes of data, envelope records {}",
                record.data_len
            ),
        )),
        Err(e) => Err(Skip::Corrupt(file.to_owned(), e.to_string())),
    }
}
