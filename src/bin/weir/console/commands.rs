//! The commands topic as the console knows it: the commands in force (the same fold every
//! process makes, [`InForce`]) and the latest commands, for the Controls page and each
//! command's page.

use std::collections::VecDeque;
use weir::{FleetCommand, InForce};

/// Commands remembered for their pages and the recent list (the topic itself keeps only the
/// latest of each key once compacted).
pub(super) const REMEMBERED: usize = 200;

/// The commands topic as the console knows it.
#[derive(Debug, Default)]
pub(crate) struct Commands {
    pub(super) in_force: InForce,
    /// The latest commands, oldest first: read from the topic, or published by this console
    /// (remembered at once, so that its page shows it before the topic gives it back).
    pub(super) recent: VecDeque<FleetCommand>,
    /// Records read so far.
    pub(super) records_read: u64,
}

impl Commands {
    /// Folds in one record of the commands topic: a command, or a tombstone (`None`) for
    /// `key`. A value that is not a command this console reads is skipped, with an error for
    /// the log.
    pub(crate) fn apply(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        self.records_read += 1;
        let Some(value) = value else {
            self.in_force.fold(Some(key), None);
            return Ok(());
        };
        let command = FleetCommand::decode(value).map_err(|e| format!("command {key}: {e}"))?;
        self.in_force.fold(Some(key), Some(command.clone()));
        self.remember(command);
        Ok(())
    }

    pub(super) fn remember(&mut self, command: FleetCommand) {
        if self.recent.iter().any(|c| c.id == command.id) {
            return;
        }
        if self.recent.len() == REMEMBERED {
            self.recent.pop_front();
        }
        self.recent.push_back(command);
    }

    pub(super) fn find(&self, id: &str) -> Option<&FleetCommand> {
        self.recent.iter().find(|c| c.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir::{Addressee, CommandAction, CommandTarget};

    #[test]
    fn the_topic_folds_into_the_commands_in_force_and_remembers_each_command_once() {
        let mut controls = Commands::default();
        let pause = FleetCommand::new(
            "t",
            Addressee::All,
            CommandAction::Pause {
                target: CommandTarget::Topic { topic: "a".into() },
            },
        );
        controls.apply(&pause.key(), Some(&pause.encode())).unwrap();
        controls.remember(pause.clone());
        assert_eq!(controls.in_force.commands().count(), 1);
        assert_eq!(controls.recent.len(), 1);
        assert!(controls.apply("x", Some(b"garbage")).is_err());
        controls.apply(&pause.key(), None).unwrap();
        assert_eq!(controls.in_force.commands().count(), 0);
        assert!(controls.find(&pause.id).is_some());
    }
}
